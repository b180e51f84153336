/// What a forward leaves for its backward: O(B·C) Float64 numbers in a caller-owned buffer, seen through a
/// typed view.
///
/// Layout, in Doubles:
/// - header (10): magic, B, C, S, G, flags, memory format, the channel norm's eps, the number of values the batch
///   statistics rest on (B·S, or the whole batch's over processes; the backward needs these two), and the byte
///   size of the input's elements (4 Float, 8 Double: a later phase of the other type would read x as garbage);
/// - per plane (b, c), B·C each: `p` mean and `q` centred sum of squares of the plane (written by the forward's
///   moments on the layouts that keep them), `t` = Σ dy and `u` = Σ dy (x - p) (written by the backward);
/// - per channel, C each: the batch-norm stage y₁ = a (x - μ) + β as `mu`, `invSigma` (1/σ), `a` (γ/σ) and
///   `beta` (μ = 0, 1/σ = 1, a = 1, β = 0 without that stage);
/// - per (sample, group), B·G each: `m` mean and `r` = 1/√(v + eps) of y₁ over the group; per group: `w`.
///
/// The header lets a later phase refuse a buffer that another shape, layer, memory format or element type filled.
public struct NormalizationContext {
    /// The header's first Double, which marks a buffer a forward filled ("BCN2").
    public static let magic: Double = 0x4243_4E32
    /// Doubles before the arrays.
    public static let headerLength = 10

    /// What the header says has been computed, and how.
    public struct Flags: OptionSet, Sendable {
        public let rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        /// Phase (a) ran: `p` and `q` hold this input's plane moments.
        public static let moments = Flags(rawValue: 1)
        /// A forward finished: every field but `t` and `u` is valid.
        public static let forward = Flags(rawValue: 2)
        public static let batchNorm = Flags(rawValue: 4)
        /// The batch-norm stage used batch statistics in training: gradients flow through them.
        public static let gradientThroughBatchStatistics = Flags(rawValue: 8)
        public static let channelNorm = Flags(rawValue: 16)
        /// Backward phase (a) ran: `t` and `u` hold this dy's plane sums.
        public static let gradientSums = Flags(rawValue: 32)
        static let all = Flags(rawValue: 63)
    }

    let base: UnsafeMutablePointer<Double>
    let shape: NormalizationShape
    let groups: Int
    /// The fields, at the offsets of the layout above (computed once: the stages read them in their loops).
    let p, q, t, u, mu, invSigma, a, beta, m, r, w: UnsafeMutablePointer<Double>

    /// Doubles a context needs for B·C planes and G groups, or nil when that overflows.
    public static func length(batch: Int, channels: Int, groups: Int) -> Int? {
        let (bc, o1) = batch.multipliedReportingOverflow(by: channels)
        let (bg, o2) = batch.multipliedReportingOverflow(by: groups)
        guard !o1, !o2, batch >= 0, channels >= 0, groups >= 0, bc <= Int.max / 16, bg <= Int.max / 16,
              channels <= Int.max / 16, groups <= Int.max / 16 else { return nil }
        return headerLength + 4 * bc + 4 * channels + 2 * bg + groups
    }

    /// A view of `buffer` for this shape; nil when the buffer is too short.
    init?(_ buffer: UnsafeMutableBufferPointer<Double>, shape: NormalizationShape, groups: Int) {
        guard let base = buffer.baseAddress,
              let n = Self.length(batch: shape.batch, channels: shape.channels, groups: groups),
              buffer.count >= n else { return nil }
        self.base = base
        self.shape = shape
        self.groups = groups
        let planes = shape.planes, C = shape.channels, bg = shape.batch * groups
        p = base + Self.headerLength; q = p + planes; t = q + planes; u = t + planes
        mu = u + planes; invSigma = mu + C; a = invSigma + C; beta = a + C
        m = beta + C; r = m + bg; w = r + bg
    }

    /// The same context seen as one-value planes of a [B, C·S] view of its [B, C, S] input (`RowsLayout`'s value
    /// view of short planes): the same header, m, r and w; μ, a and β per value of a row (each channel's repeated
    /// S times, in storage the caller owns). The channel-norm stage's value methods and the rows' value sinks read
    /// it; it is never stamped (`writeHeader` would write the view's shape). Its invSigma, p, q, t and u are still
    /// the planes' (per channel, or per plane): the batch-norm stage's backward takes the planes' own context.
    init(valuesOf ctx: NormalizationContext, shape: NormalizationShape, mu: UnsafeMutablePointer<Double>,
         a: UnsafeMutablePointer<Double>, beta: UnsafeMutablePointer<Double>) {
        base = ctx.base; self.shape = shape; groups = ctx.groups
        p = ctx.p; q = ctx.q; t = ctx.t; u = ctx.u; invSigma = ctx.invSigma; m = ctx.m; r = ctx.r; w = ctx.w
        self.mu = mu; self.a = a; self.beta = beta
    }

    /// Stamps the header: what is valid now, for this shape, memory format and element type (`groupEps` and
    /// `statisticsCount` are left alone).
    func writeHeader<T: NormalizationScalar>(_ flags: Flags, format: MemoryFormat, of _: T.Type) {
        base[0] = Self.magic
        base[1] = Double(shape.batch); base[2] = Double(shape.channels); base[3] = Double(shape.spatial)
        base[4] = Double(groups); base[5] = Double(flags.rawValue); base[6] = Double(format.rawValue)
        base[9] = Self.element(T.self)
    }

    /// The header's word for an element type: its size in bytes.
    static func element<T: NormalizationScalar>(_: T.Type) -> Double { Double(MemoryLayout<T>.size) }

    /// The channel-norm stage's eps of the forward that filled the context (its backward needs it).
    var groupEps: Double {
        get { base[7] }
        nonmutating set { base[7] = newValue }
    }

    /// How many values the forward's batch statistics rest on: n in the backward's S₁/n and S₂/(σ² n), which
    /// over several processes is the whole batch's count, not this process's B·S.
    var statisticsCount: Double {
        get { base[8] }
        nonmutating set { base[8] = newValue }
    }

    /// The header's flags if it was written for this shape, group count and memory format, and for input of
    /// `element`'s size (`element(_:)`; nil: either type), else nil.
    func readFlags(format: MemoryFormat, element: Double?) -> Flags? {
        guard base[0] == Self.magic, base[1] == Double(shape.batch), base[2] == Double(shape.channels),
              base[3] == Double(shape.spatial), base[4] == Double(groups), base[6] == Double(format.rawValue),
              base[5] >= 0, base[5] <= Double(Flags.all.rawValue), base[5] == base[5].rounded(),
              element == nil || base[9] == element
        else { return nil }
        return Flags(rawValue: Int(base[5]))
    }
}
