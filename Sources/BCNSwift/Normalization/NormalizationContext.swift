/// What a forward leaves for its backward: Float64 numbers of size O(B·C), in a caller-owned buffer.
///
/// Layout (offsets in Doubles): a header of 8 (magic, B, C, S, G, flags, 0, 0), then
/// p[B·C] plane means, q[B·C] plane centred sums of squares, ȳ[B·C] plane means after the batch-norm stage,
/// μ[C] batch-norm centre, 1/σ[C], a[C] = γ/σ, m[B·G] group means, r[B·G] = 1/√(v + eps), w[G] group weights.
/// The header lets `backward` refuse a buffer that another shape or layer filled.
public struct NormalizationContextLayout: Sendable {
    public static let magic: Double = 0x4243_4E31  // "BCN1"
    public static let headerLength = 8

    public let batch, channels, spatial, groups: Int
    public let p, q, yBar, mu, invSigma, a, m, r, w: Int
    public let length: Int

    /// Flags stored in the header: which stages ran, and whether gradients flow through batch statistics.
    public struct Flags: OptionSet, Sendable {
        public let rawValue: Int
        public init(rawValue: Int) { self.rawValue = rawValue }
        public static let batchNorm = Flags(rawValue: 1)
        public static let gradientThroughBatchStatistics = Flags(rawValue: 2)
        public static let channelNorm = Flags(rawValue: 4)
        /// Filled by the row path (short planes): no per-plane numbers, ȳ's first C slots hold β.
        public static let rows = Flags(rawValue: 8)
    }

    public init(shape: NormalizationShape, groups: Int) {
        batch = shape.batch; channels = shape.channels; spatial = shape.spatial; self.groups = groups
        let bc = shape.planes, bg = shape.batch * groups
        p = Self.headerLength
        q = p + bc
        yBar = q + bc
        mu = yBar + bc
        invSigma = mu + channels
        a = invSigma + channels
        m = a + channels
        r = m + bg
        w = r + bg
        length = w + groups
    }

    /// Doubles a context needs for this shape, or nil when that overflows.
    public static func length(batch: Int, channels: Int, groups: Int) -> Int? {
        let (bc, o1) = batch.multipliedReportingOverflow(by: channels)
        let (bg, o2) = batch.multipliedReportingOverflow(by: groups)
        guard !o1, !o2, bc <= Int.max / 8, bg <= Int.max / 8, channels <= Int.max / 8 else { return nil }
        return headerLength + 3 * bc + 3 * channels + 2 * bg + groups
    }

    func writeHeader(_ ctx: UnsafeMutablePointer<Double>, flags: Flags) {
        ctx[0] = Self.magic
        ctx[1] = Double(batch); ctx[2] = Double(channels); ctx[3] = Double(spatial); ctx[4] = Double(groups)
        ctx[5] = Double(flags.rawValue); ctx[6] = 0; ctx[7] = 0
    }

    /// The flags if the header matches this layout, else nil.
    func readFlags(_ ctx: UnsafePointer<Double>) -> Flags? {
        guard ctx[0] == Self.magic, ctx[1] == Double(batch), ctx[2] == Double(channels),
              ctx[3] == Double(spatial), ctx[4] == Double(groups), ctx[5] >= 0, ctx[5] < 16 else { return nil }
        return Flags(rawValue: Int(ctx[5]))
    }
}

/// Planes shorter than this take the row path (FusedNormalization+Rows.swift) instead of per-plane kernels.
@usableFromInline let smallPlane = 16

/// Iterates the fixed partition of B·C planes of S elements into chunks of at most `planeChunkLength`.
@usableFromInline
struct PlaneChunks {
    @usableFromInline let spatial: Int
    @usableFromInline let perPlane: Int
    @usableFromInline let count: Int

    @inlinable init(_ shape: NormalizationShape) {
        spatial = shape.spatial
        perPlane = (shape.spatial + planeChunkLength - 1) / planeChunkLength
        count = shape.planes * perPlane
    }

    /// (plane index, element offset, element count) of chunk `i`.
    @inlinable func chunk(_ i: Int) -> (plane: Int, offset: Int, length: Int) {
        if perPlane == 1 { return (i, i * spatial, spatial) }  // the common case, without a 64-bit division
        let plane = i / perPlane, k = i - plane * perPlane
        let start = k * planeChunkLength
        return (plane, plane * spatial + start, min(planeChunkLength, spatial - start))
    }
}
