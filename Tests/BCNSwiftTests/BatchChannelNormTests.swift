import BCNSwift
import BCNSwiftTestSupport
import XCTest
#if canImport(Glibc)
import Glibc
#endif

final class BatchChannelNormTests: XCTestCase {
    var rng = SplitMix64(seed: 0x5EED)

    func input(_ count: Int, channels C: Int, spatial S: Int) -> [Double] {
        let means = (0..<C).map { _ in rng.normal(2, 1) },
            stds = (0..<C).map { _ in Double.random(in: 0.5...3, using: &rng) }
        return (0..<count).map { i in rng.normal(means[(i / S) % C], stds[(i / S) % C]) }
    }

    /// Random parameters and buffers, the same on both sides.
    func randomize<T>(_ layer: NormalizationLayer<T>, _ ref: inout ReferenceBCN) {
        let C = layer.bnWeight.count, G = layer.weight.count
        for c in 0..<C {
            let g = T(Double.random(in: 0.5...1.5, using: &rng)), b = T(rng.normal(0.3, 0.5))
            let m = T(rng.normal(0.5, 0.5)), v = T(Double.random(in: 0.5...2, using: &rng))
            layer.bnWeight[c] = g; layer.bnBias[c] = b; layer.runningMean[c] = m; layer.runningVar[c] = v
            ref.gamma[c] = Double(g); ref.beta[c] = Double(b)
            ref.runningMean[c] = Double(m); ref.runningVar[c] = Double(v)
        }
        for g in 0..<G {
            let w = T(Double.random(in: 0.5...1.5, using: &rng)), b = T(rng.normal(0.3, 0.5))
            layer.weight[g] = w; layer.bias[g] = b; ref.w[g] = Double(w); ref.b[g] = Double(b)
        }
    }

    func check<T: NormalizationScalar>(_ type: T.Type, tolerance: Double, kind: ReferenceBCN.BatchNormKind,
                                       groups: Int, shape: [Int], file: StaticString = #filePath,
                                       line: UInt = #line) throws {
        let C = shape[1], S = shape.dropFirst(2).reduce(1, *), B = shape[0]
        let layer: NormalizationLayer<T>
        var ref: ReferenceBCN
        switch kind {
        case .none:
            layer = try ChannelNorm<T>(channels: C, groups: groups)
            ref = ReferenceBCN(channels: C, groups: groups, kind: .none, unbiased: false)
        case .batch:
            layer = groups > 0 ? try BatchChannelNorm<T>(channels: C, groups: groups, estimate: false)
                               : try BatchNorm<T>(channels: C)
            ref = ReferenceBCN(channels: C, groups: groups, kind: .batch, unbiased: true)
        case .estimated(let around):
            let centre: VarianceCentre = around ? .runningMean : .batchMean
            layer = groups > 0 ? try BatchChannelNorm<T>(channels: C, groups: groups, varianceCentre: centre)
                               : try EstimatedBatchNorm<T>(channels: C, varianceCentre: centre)
            ref = ReferenceBCN(channels: C, groups: groups, kind: kind, unbiased: false)
        }
        randomize(layer, &ref)
        for step in 0..<3 {
            layer.training = step < 2
            let x64 = input(B * C * S, channels: C, spatial: S)
            let x = x64.map { T($0) }
            let y = try layer.forward(x, shape: shape)
            let yRef = ref.forward(x.map { Double($0) }, batch: B, spatial: S, training: step < 2)
            XCTAssertLessThan(maxScaledError(y, yRef), tolerance, "output, step \(step)", file: file, line: line)
            if layer.plan.batchNorm != nil {
                XCTAssertLessThan(maxScaledError(layer.runningMean, ref.runningMean), tolerance, file: file, line: line)
                XCTAssertLessThan(maxScaledError(layer.runningVar, ref.runningVar), tolerance, file: file, line: line)
            }
        }
    }

    func testMatchesReferenceForEveryKindRankAndDtype() throws {
        let kinds: [ReferenceBCN.BatchNormKind] = [.batch, .estimated(aroundRunningMean: false),
                                                   .estimated(aroundRunningMean: true)]
        for shape in [[6, 8], [3, 8, 5], [2, 8, 3, 4], [1, 8, 2, 3, 2]] {
            for kind in kinds {
                if case .batch = kind, shape[0] * shape.dropFirst(2).reduce(1, *) == 1 { continue }
                for groups in [0, 4, 1] {
                    try check(Double.self, tolerance: 1e-10, kind: kind, groups: groups, shape: shape)
                    try check(Float.self, tolerance: 1e-4, kind: kind, groups: groups, shape: shape)
                }
            }
            try check(Double.self, tolerance: 1e-10, kind: .none, groups: 2, shape: shape)
            try check(Float.self, tolerance: 1e-4, kind: .none, groups: 2, shape: shape)
        }
    }

    /// Also the per-thread scratch of every layout: this debug build stops at any region beyond the size a call
    /// reserved up front (`ScratchArena`).
    func testResultsDoNotDependOnThreadCount() throws {
        // planes split in chunks; rows of one value per plane and of 9, in groups of 33 channels (blocks and
        // panels that end off the lanes); rows of one value in groups of 64 (the Float32 lanes, forward and
        // backward, with the Float64 path for the channels offset below; four panels of 512 channels, so that
        // the backward too runs on several threads); planes of 4 in units of 32 values (the value view of short
        // planes, `RowsValueView`, forward and backward), on 15 samples too (rows staged four, two and one at a
        // time; the view's per-value context filled panel by panel); planes of 9 on 16 samples (the view's
        // backward only); all large enough to run on several threads; a training step, then an eval step (whose
        // backward sums the batch-norm stage's gradients beside dx)
        // [2, 64, 16, 16] in 32 groups: the eval forward measures and maps each unit in one loop whose cost
        // (65536) takes two threads where the measuring alone (32768) would take one: its scratch must have two
        // slots (it had one, and the second thread wrote past it); channels-last with one stretch a sample and
        // 2048 planes (each sample's work item finds its dy shifts; the units' coefficients, the maps' constants
        // and the gradient sums' finish on several threads), and with two stretches a sample
        let shapes: [([Int], Int, MemoryFormat)] = [
            ([4, 16, 64, 65], 4, .channelsFirst), ([512, 264], 8, .channelsFirst), ([64, 264, 3, 3], 8, .channelsFirst),
            ([64, 2048], 32, .channelsFirst), ([64, 256, 2, 2], 32, .channelsFirst),
            ([15, 512, 2, 2], 32, .channelsFirst), ([16, 256, 3, 3], 32, .channelsFirst),
            ([2, 64, 16, 16], 32, .channelsFirst), ([8, 256, 4, 4], 32, .channelsLast),
            ([2, 64, 40, 40], 32, .channelsLast),
        ]
        for (shape, groups, format) in shapes {
            let C = shape[1], S = shape.dropFirst(2).reduce(1, *)
            var x = input(shape.reduce(1, *), channels: C, spatial: S).map { Float($0) }
            if S < 16 {  // every third sample's first C/2 channels far off: groups on the Float64 path
                for b in Swift.stride(from: 0, to: shape[0], by: 3) {
                    for i in 0..<C / 2 * S { x[b * C * S + i] += 50 }
                }
            }
            let dy = (0..<x.count).map { _ in Float(rng.normal(0.3, 1)) }
            var results: [[Float]] = []
            for threads in [1, 2, 16] {
                BCNThreads.count = threads
                let layer = try BatchChannelNorm<Float>(channels: C, groups: groups, estimate: false)
                let y = try layer.forward(x, shape: shape, format: format)
                let dx = try layer.backward(dy)
                layer.training = false
                let yEval = try layer.forward(x, shape: shape, format: format)
                let dxEval = try layer.backward(dy)
                results.append(y + dx + yEval + dxEval + layer.runningVar + layer.gradBnWeight + layer.gradWeight)
            }
            BCNThreads.count = 0
            XCTAssertEqual(results[0], results[1], "\(shape) \(format)")
            XCTAssertEqual(results[0], results[2], "\(shape) \(format)")
        }
    }

    func testAnInputWithoutValuesGivesAnEmptyOutputAndChangesNothing() throws {
        let layer = try BatchChannelNorm<Double>(channels: 4, groups: 2, estimate: false)
        let x: [Double] = (0..<24).map { 1.5 + Double($0 % 7) * 0.25 }
        _ = try layer.forward(x, shape: [2, 4, 3])
        _ = try layer.backward(x.map { $0 - 1 })
        let state = (layer.runningMean, layer.runningVar, layer.numBatchesTracked, layer.gradBnWeight, layer.gradWeight)
        for shape in [[0, 4, 3], [2, 4, 0], [0, 4]] {
            let formats: [MemoryFormat] = shape.count == 2 ? [.channelsFirst] : [.channelsFirst, .channelsLast]
            for format in formats {
                XCTAssertEqual(try layer.forward([], shape: shape, format: format), [])
                XCTAssertEqual(try layer.backward([]), [])
            }
        }
        XCTAssertEqual(layer.runningMean, state.0)
        XCTAssertEqual(layer.runningVar, state.1)
        XCTAssertEqual(layer.numBatchesTracked, state.2)
        XCTAssertEqual(layer.gradBnWeight, state.3)
        XCTAssertEqual(layer.gradWeight, state.4)
        XCTAssertThrowsError(try layer.forward([], shape: [0, 3, 2])) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch)
        }
        XCTAssertThrowsError(try layer.forward([1], shape: [0, 4, 2]))
        XCTAssertThrowsError(try layer.forward([], shape: [-1, 4, 0]))
    }

    func testAPlanWithoutStagesIsRefused() {
        // neither stage would be the identity, which no caller means: the C ABI refuses such flags too
        XCTAssertThrowsError(try NormalizationLayer<Float>(plan: NormalizationPlan(channels: 4, batchNorm: nil,
                                                                                 channelNorm: nil))) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .invalidArgument)
            XCTAssertEqual((error as? BCNError)?.message,
                           "a plan needs a batch-norm stage, a channel-norm stage or both")
        }
    }

    func testAnEpsOutOfRangeIsNamedAsTheCallerGaveIt() {
        // one eps for both stages is `eps`; with bnEps apart, each message names its stage
        let cases: [(() throws -> Void, String)] = [
            ({ _ = try BatchChannelNorm<Float>(channels: 4, groups: 2, eps: -1) },
             "eps must be a positive finite number, got -1.0"),
            ({ _ = try BatchChannelNorm<Double>(channels: 4, groups: 2, eps: .infinity, estimate: false) },
             "eps must be a positive finite number, got inf"),
            ({ _ = try BatchChannelNorm<Float>(channels: 4, groups: 2, eps: 1e-5, bnEps: 0) },
             "the batch-norm stage's eps must be a positive finite number, got 0.0"),
            ({ _ = try BatchChannelNorm<Float>(channels: 4, groups: 2, eps: -2, bnEps: 1e-3) },
             "the channel-norm stage's eps must be a positive finite number, got -2.0"),
            ({ _ = try BatchNorm<Float>(channels: 4, eps: 0) }, "the batch-norm stage's eps must be"),
            ({ _ = try ChannelNorm<Float>(channels: 4, groups: 2, eps: .nan) }, "the channel-norm stage's eps must be"),
        ]
        for (make, expected) in cases {
            XCTAssertThrowsError(try make(), expected) { error in
                XCTAssertEqual((error as? BCNError)?.kind, .invalidArgument)
                let message = (error as? BCNError)?.message ?? ""
                XCTAssertTrue(message.hasPrefix(expected), "expected '\(expected)...', got '\(message)'")
            }
        }
    }

    func testALayerBeyondMemoryThrowsInsteadOfStoppingTheProcess() throws {
        // 2^31 channels of Double: about 200 GB of arrays. Under an address-space limit malloc refuses them
        // whatever the kernel's overcommit policy, and the layer must say so; Swift arrays would stop the process.
        #if canImport(Glibc)
        let needed = (10 << 31) * 8 + (6 << 20) * 8
        // the limit: this process's address space now plus 64 GB (a sanitizer's shadow is already far larger)
        guard let mapped = Self.addressSpaceInUse(), mapped + (1 << 36) < needed / 2 else {
            throw XCTSkip("this process already maps too much address space for a limit below the layer's size")
        }
        var saved = rlimit()
        guard getrlimit(Int32(RLIMIT_AS.rawValue), &saved) == 0 else { throw XCTSkip("getrlimit failed") }
        var limited = saved
        limited.rlim_cur = min(saved.rlim_max, rlim_t(mapped + (1 << 36)))
        guard setrlimit(Int32(RLIMIT_AS.rawValue), &limited) == 0 else { throw XCTSkip("setrlimit failed") }
        defer { XCTAssertEqual(setrlimit(Int32(RLIMIT_AS.rawValue), &saved), 0) }
        XCTAssertThrowsError(try BatchChannelNorm<Double>(channels: 1 << 31, groups: 1 << 20)) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .outOfMemory)
            XCTAssertEqual((error as? BCNError)?.message, "could not allocate \(needed) "
                           + "bytes for a layer of 2147483648 channels (its parameters, buffers and gradients)")
        }
        // and a layer that fits is made as before
        let fits = try BatchChannelNorm<Double>(channels: 64, groups: 8)
        XCTAssertEqual(fits.runningVar, [Double](repeating: 1, count: 64))
        #else
        throw XCTSkip("RLIMIT_AS is Linux's: other systems do not enforce it")
        #endif
    }

    /// A call whose own arrays (the output, dx, a weight's) the system will not map throws `.outOfMemory` and
    /// changes nothing, where Swift arrays would stop the process: an input of 64 MB under an address-space
    /// limit 32 MB above what the process maps, so the input fits and its output does not.
    func testACallWhoseArraysCannotBeAllocatedThrows() throws {
        #if canImport(Glibc)
        let shape = [16, 64, 128, 128], count = shape.reduce(1, *)  // 2^24 Floats
        let layer = try BatchChannelNorm<Float>(channels: 64, groups: 8)
        let small = (0..<(2 * 64 * 9)).map { _ in Float(rng.normal(2, 1)) }
        _ = try layer.forward(small, shape: [2, 64, 3, 3])
        let kept = layer.state, x = [Float](repeating: 1.5, count: count), dy = x
        var saved = rlimit()
        guard getrlimit(Int32(RLIMIT_AS.rawValue), &saved) == 0 else { throw XCTSkip("getrlimit failed") }
        func limited(_ body: () throws -> Void) throws {
            guard let mapped = Self.addressSpaceInUse() else { throw XCTSkip("/proc/self/statm is unreadable") }
            var limit = saved
            limit.rlim_cur = min(saved.rlim_max, rlim_t(mapped + (32 << 20)))
            guard setrlimit(Int32(RLIMIT_AS.rawValue), &limit) == 0 else { throw XCTSkip("setrlimit failed") }
            defer { XCTAssertEqual(setrlimit(Int32(RLIMIT_AS.rawValue), &saved), 0) }
            try body()
        }
        func refused(_ call: @autoclosure () throws -> [Float], _ what: String) {
            XCTAssertThrowsError(try call()) { error in
                XCTAssertEqual((error as? BCNError)?.kind, .outOfMemory, what)
                XCTAssertTrue((error as? BCNError)?.message.hasSuffix(what) ?? false, "\(error)")
            }
        }
        try limited {
            refused(try layer.forward(x, shape: shape), "the output and context of a forward of shape \(shape)")
            refused(try WeightStandardization.standardize(x, shape: [64, count / 64]),
                    "the standardized weight of shape [64, \(count / 64)]")
            refused(try WeightStandardization.gradient(x, dy, shape: [64, count / 64]),
                    "the gradient of a weight of shape [64, \(count / 64)]")
        }
        XCTAssertEqual(layer.state, kept)
        // the refused forward left the last one differentiable
        XCTAssertEqual(try layer.backward(small).count, small.count)
        // the backward of the 64 MB forward, once it could run, refused as memory runs out again
        layer.training = false
        _ = try layer.forward(x, shape: shape)
        let gradients = (layer.gradBnWeight, layer.gradWeight)
        try limited { refused(try layer.backward(dy), "the input gradient of \(count) values") }
        XCTAssertEqual(layer.gradBnWeight, gradients.0)
        XCTAssertEqual(layer.gradWeight, gradients.1)
        XCTAssertEqual(try layer.backward(dy).count, count)  // and runs once memory is there
        #else
        throw XCTSkip("RLIMIT_AS is Linux's: other systems do not enforce it")
        #endif
    }

    #if canImport(Glibc)
    /// Bytes of address space this process maps now: the first field of /proc/self/statm, in pages.
    static func addressSpaceInUse() -> Int? {
        guard let file = fopen("/proc/self/statm", "r") else { return nil }
        defer { fclose(file) }
        var line = [CChar](repeating: 0, count: 128)
        guard fgets(&line, Int32(line.count), file) != nil else { return nil }
        let digits = line.prefix { $0 >= 48 && $0 <= 57 }  // the leading number, in ASCII
        guard !digits.isEmpty else { return nil }
        let pages = digits.reduce(0) { $0 * 10 + Int($1 - 48) }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
    #endif

    func testErrorsChangeNothing() throws {
        let layer = try BatchChannelNorm<Float>(channels: 4, groups: 2, estimate: false)
        XCTAssertThrowsError(try layer.forward([1, 2, 3, 4], shape: [1, 4])) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .degenerateStatistics)
        }
        XCTAssertThrowsError(try layer.forward([1, 2, 3], shape: [1, 3]))
        XCTAssertThrowsError(try layer.forward([1, 2, 3, 4], shape: [4]))
        XCTAssertThrowsError(try layer.backward([1, 2, 3, 4])) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .noForward)
        }
        let raising = try BatchChannelNorm<Float>(channels: 2, groups: 1, estimate: false, nanPolicy: .raise)
        XCTAssertThrowsError(try raising.forward([1, .nan, 3, 4], shape: [2, 2])) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .nonFinite)
        }
        XCTAssertEqual(layer.runningMean, [0, 0, 0, 0])
        XCTAssertEqual(layer.runningVar, [1, 1, 1, 1])
        XCTAssertEqual(raising.numBatchesTracked, 0)
        XCTAssertThrowsError(try BatchChannelNorm<Float>(channels: 6, groups: 4))
        XCTAssertThrowsError(try BatchChannelNorm<Float>(channels: 4, groups: 2, eps: 0))
        XCTAssertThrowsError(try BatchChannelNorm<Float>(channels: 4, groups: 2, momentum: 1.5))
    }

    /// What a review reached through the public API: a phase (c) under `.raise` fed moments holding NaN (merged
    /// from another process, say), merges whose sizes overflow, and a layer of more channels than any buffer
    /// could hold; each throws and writes nothing.
    func testPhasesAndSizesThatWouldCorruptOrTrapThrow() throws {
        let plan = NormalizationPlan(channels: 2, batchNorm: BatchNormOptions(statistics: .batch), channelNorm: nil,
                                     nanPolicy: .raise)
        let shape = try NormalizationShape(batch: 2, channels: 2, spatial: 3)
        let x: [Float] = (0..<12).map { _ in Float(rng.normal(1.5, 1)) }
        var ctx = [Double](repeating: 0, count: NormalizationContext.length(batch: 2, channels: 2, groups: 0)!)
        var moments = [Moments](repeating: Moments(), count: 2)
        try ctx.withUnsafeMutableBufferPointer { (c) throws(BCNError) in
            try NormalizationEngine.localMoments(plan: plan, shape: shape, x: x, context: c, into: &moments)
        }
        moments[1].mean = .nan
        var w: [Float] = [1, 1], b: [Float] = [0, 0], rm: [Float] = [0.5, 0.5], rv: [Float] = [1, 1]
        var count: Int64 = 3
        var y = [Float](repeating: 7, count: 12)
        XCTAssertThrowsError(try ctx.withUnsafeMutableBufferPointer { (c) throws(BCNError) in
            try NormalizationEngine.finishForward(
                plan: plan, shape: shape, training: true, x: x, y: &y,
                state: NormalizationState(bnWeight: &w, bnBias: &b, runningMean: &rm, runningVar: &rv,
                                          numBatchesTracked: &count),
                batchMoments: moments, context: c)
        }) { XCTAssertEqual(($0 as? BCNError)?.kind, .nonFinite) }
        XCTAssertEqual(rm, [0.5, 0.5]); XCTAssertEqual(rv, [1, 1]); XCTAssertEqual(count, 3)
        XCTAssertEqual(y, [Float](repeating: 7, count: 12))

        var merged = [Moments](repeating: Moments(), count: 2), sums = [Double](repeating: 0, count: 4)
        XCTAssertThrowsError(try NormalizationEngine.mergeMoments(sets: Int.max, channels: 2, moments, into: &merged))
        XCTAssertThrowsError(try NormalizationEngine.mergeGradientSums(sets: 1, channels: Int.max, sums, into: &sums))
        XCTAssertThrowsError(try NormalizationEngine.mergeGradientSums(sets: Int.max / 2, channels: 2, sums,
                                                                       into: &sums))
        XCTAssertThrowsError(try BatchChannelNorm<Float>(channels: Int.max / 4, groups: 1)) {
            XCTAssertEqual(($0 as? BCNError)?.kind, .invalidArgument)
        }
    }

    /// A review: `.runningMean` with batch statistics was taken and ignored; it is refused now. (Its other
    /// finding, a negative count that trains but does not load, stays: training takes it as PyTorch's does, and
    /// `validate(for:)` says why loading does not.)
    func testAVarianceCentreWithoutEstimatesIsRefused() throws {
        XCTAssertThrowsError(try BatchChannelNorm<Float>(channels: 4, groups: 2, estimate: false,
                                                         varianceCentre: .runningMean)) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .invalidArgument)
        }
        XCTAssertNoThrow(try BatchChannelNorm<Float>(channels: 4, groups: 2, estimate: true,
                                                     varianceCentre: .runningMean))
    }

    func testWeightStandardizationMatchesReference() throws {
        for shape in [[6, 5], [4, 3, 3], [3, 2, 3, 3], [2, 2, 2, 2, 3]] {
            let n = shape.reduce(1, *)
            let w = (0..<n).map { _ in rng.normal(0.2, 0.3) }
            for unbiased in [true, false] {
                for inside in [true, false] {
                    let opts = WeightStandardizationOptions(eps: 1e-5, unbiased: unbiased, epsInsideSquareRoot: inside)
                    let ref = referenceWeightStandardization(w, outChannels: shape[0], eps: 1e-5, unbiased: unbiased,
                                                             epsInsideSquareRoot: inside)
                    XCTAssertLessThan(maxScaledError(try WeightStandardization.standardize(w, shape: shape,
                                                                                           options: opts), ref), 1e-12)
                    let wf = w.map { Float($0) }
                    XCTAssertLessThan(maxScaledError(try WeightStandardization.standardize(wf, shape: shape,
                                                                                           options: opts),
                                                     referenceWeightStandardization(wf.map { Double($0) },
                                                                                    outChannels: shape[0], eps: 1e-5,
                                                                                    unbiased: unbiased,
                                                                                    epsInsideSquareRoot: inside)),
                                      1e-5)
                    // gradient by finite differences of the reference
                    let g = (0..<n).map { _ in rng.normal() }
                    let dw = try WeightStandardization.gradient(w, g, shape: shape, options: opts)
                    for i in stride(from: 0, to: n, by: 7) {
                        var p = w, m = w
                        p[i] += 1e-6; m[i] -= 1e-6
                        func f(_ v: [Double]) -> Double {
                            zip(referenceWeightStandardization(v, outChannels: shape[0], eps: 1e-5, unbiased: unbiased,
                                                               epsInsideSquareRoot: inside),
                                g).reduce(0) { $0 + $1.0 * $1.1 }
                        }
                        XCTAssertEqual(dw[i], (f(p) - f(m)) / 2e-6, accuracy: 1e-5)
                    }
                }
            }
        }
        XCTAssertThrowsError(try WeightStandardization.standardize([1.0, 2.0], shape: [2, 1]))
    }

    /// A weight whose count does not match its shape is refused with both numbers; a shape with a dimension
    /// below 1, or one whose count overflows, in its own words.
    func testWeightStandardizationNamesTheCountItsShapeNeeds() {
        func message(_ w: [Double], _ shape: [Int]) -> String? {
            do {
                _ = try WeightStandardization.standardize(w, shape: shape)
                return nil
            } catch {
                return error.message
            }
        }
        let w = (0..<7).map { Double($0) + 0.5 }
        XCTAssertEqual(message(w, [2, 3]), "weight has 7 elements, shape [2, 3] needs 6")
        XCTAssertEqual(message(w, [0, 3]), "weight dimensions must be positive, got shape [0, 3]")
        XCTAssertEqual(message(w, [-2, 3]), "weight dimensions must be positive, got shape [-2, 3]")
        XCTAssertEqual(message(w, [Int.max, 3]), "weight shape [\(Int.max), 3] is too large")
    }

    /// Two training forwards and an eval one of `layer` against `ref` (which holds the same parameters): the
    /// outputs, and the running buffers where there is a batch-norm stage.
    func compare<T: NormalizationScalar>(_ layer: NormalizationLayer<T>, _ ref: inout ReferenceBCN, shape: [Int],
                                         tolerance: Double, _ what: String, file: StaticString = #filePath,
                                         line: UInt = #line) throws {
        let B = shape[0], C = shape[1], S = shape.dropFirst(2).reduce(1, *)
        for step in 0..<3 {
            layer.training = step < 2
            let x = input(B * C * S, channels: C, spatial: S).map { T($0) }
            let y = try layer.forward(x, shape: shape)
            let yRef = ref.forward(x.map { Double($0) }, batch: B, spatial: S, training: step < 2)
            XCTAssertLessThan(maxScaledError(y, yRef), tolerance, "\(what): output, step \(step)", file: file,
                              line: line)
            if layer.plan.batchNorm != nil {
                XCTAssertLessThan(maxScaledError(layer.runningMean, ref.runningMean), tolerance, "\(what): mean",
                                  file: file, line: line)
                XCTAssertLessThan(maxScaledError(layer.runningVar, ref.runningVar), tolerance, "\(what): var",
                                  file: file, line: line)
            }
        }
    }

    /// A fresh layer, its parameters and buffers untouched, and a layer of a plan of default options compute the
    /// reference with the documents' values: γ, w = 1, β, b = 0, running mean 0 and variance 1, eps 1e-5, momentum
    /// 0.1, the running variance unbiased with batch statistics and biased when estimating.
    func testFreshLayersAndDefaultOptionsAreTheDocumentedOnes() throws {
        let C = 8, G = 4, shape = [3, 8, 5]
        let layers: [(String, NormalizationLayer<Double>, ReferenceBCN)] = [
            ("BatchChannelNorm", try BatchChannelNorm<Double>(channels: C, groups: G),
             ReferenceBCN(channels: C, groups: G, kind: .estimated(aroundRunningMean: false), unbiased: false)),
            ("BatchNorm", try BatchNorm<Double>(channels: C),
             ReferenceBCN(channels: C, groups: 0, kind: .batch, unbiased: true)),
            ("EstimatedBatchNorm", try EstimatedBatchNorm<Double>(channels: C),
             ReferenceBCN(channels: C, groups: 0, kind: .estimated(aroundRunningMean: false), unbiased: false)),
            ("ChannelNorm", try ChannelNorm<Double>(channels: C, groups: G),
             ReferenceBCN(channels: C, groups: G, kind: .none, unbiased: false)),
            ("plan of default options",
             try NormalizationLayer<Double>(plan: NormalizationPlan(channels: C, batchNorm: BatchNormOptions(),
                                                                    channelNorm: ChannelNormOptions(groups: G))),
             ReferenceBCN(channels: C, groups: G, kind: .batch, unbiased: true)),
            ("plan of default estimated options",
             try NormalizationLayer<Double>(plan: NormalizationPlan(
                channels: C, batchNorm: BatchNormOptions(statistics: .estimated), channelNorm: nil)),
             ReferenceBCN(channels: C, groups: 0, kind: .estimated(aroundRunningMean: false), unbiased: false)),
        ]
        for (name, layer, reference) in layers {
            var ref = reference
            try compare(layer, &ref, shape: shape, tolerance: 1e-10, name)
            XCTAssertEqual(layer.numBatchesTracked, layer.plan.batchNorm == nil ? 0 : 2, name)
        }
    }

    /// `unbiasedRunningVariance` given to a BatchChannelNorm overrides the documents' choice, in both modes.
    func testBatchChannelNormTakesTheRunningVarianceConventionItIsGiven() throws {
        let C = 8, G = 4
        for estimate in [true, false] {
            for unbiased in [true, false] {
                let layer = try BatchChannelNorm<Double>(channels: C, groups: G, estimate: estimate,
                                                         unbiasedRunningVariance: unbiased)
                var ref = ReferenceBCN(channels: C, groups: G,
                                       kind: estimate ? .estimated(aroundRunningMean: false) : .batch,
                                       unbiased: unbiased)
                randomize(layer, &ref)
                try compare(layer, &ref, shape: [4, 8, 3], tolerance: 1e-10,
                            "estimate \(estimate) unbiased \(unbiased)")
            }
        }
    }

    /// Momentum 0 and 1, the ends of its range, are taken: 0 keeps the running buffers, 1 replaces them with the
    /// batch's statistics.
    func testMomentumAtTheEndsOfItsRange() throws {
        for momentum in [0.0, 1.0] {
            for estimate in [true, false] {
                let layer = try BatchChannelNorm<Double>(channels: 8, groups: 2, momentum: momentum, estimate: estimate)
                var ref = ReferenceBCN(channels: 8, groups: 2,
                                       kind: estimate ? .estimated(aroundRunningMean: false) : .batch,
                                       momentum: momentum, unbiased: !estimate)
                randomize(layer, &ref)
                try compare(layer, &ref, shape: [3, 8, 4], tolerance: 1e-10,
                            "momentum \(momentum) estimate \(estimate)")
            }
            let batchNorm = try BatchNorm<Double>(channels: 8, momentum: momentum)
            var ref = ReferenceBCN(channels: 8, groups: 0, kind: .batch, momentum: momentum, unbiased: true)
            randomize(batchNorm, &ref)
            try compare(batchNorm, &ref, shape: [3, 8, 4], tolerance: 1e-10, "BatchNorm, momentum \(momentum)")
        }
    }

    /// Every layer class takes its `nanPolicy`: `.raise` refuses NaN or infinity in x and changes nothing.
    func testEveryLayerRaisesOnNonFiniteInputWhenAskedTo() throws {
        let layers: [(String, NormalizationLayer<Float>)] = [
            ("BatchChannelNorm", try BatchChannelNorm<Float>(channels: 4, groups: 2, nanPolicy: .raise)),
            ("BatchNorm", try BatchNorm<Float>(channels: 4, nanPolicy: .raise)),
            ("EstimatedBatchNorm", try EstimatedBatchNorm<Float>(channels: 4, nanPolicy: .raise)),
            ("ChannelNorm", try ChannelNorm<Float>(channels: 4, groups: 2, nanPolicy: .raise)),
        ]
        for (name, layer) in layers {
            for bad in [Float.nan, .infinity] {
                var x = input(24, channels: 4, spatial: 3).map { Float($0) }
                x[7] = bad
                let kept = layer.state
                XCTAssertThrowsError(try layer.forward(x, shape: [2, 4, 3]), name) { error in
                    XCTAssertEqual((error as? BCNError)?.kind, .nonFinite, name)
                }
                XCTAssertEqual(layer.state, kept, name)
            }
        }
    }

    /// The layer's arrays are public: one resized by hand is refused by the next forward, with or without values,
    /// named, and nothing changes.
    func testAParameterOrBufferResizedByHandIsRefusedByForward() throws {
        let x = input(24, channels: 4, spatial: 3).map { Float($0) }
        let paths: [(String, ReferenceWritableKeyPath<NormalizationLayer<Float>, [Float]>)] = [
            ("bnWeight", \.bnWeight), ("bnBias", \.bnBias), ("runningMean", \.runningMean),
            ("runningVar", \.runningVar), ("weight", \.weight), ("bias", \.bias),
        ]
        for (name, path) in paths {
            for grow in [true, false] {
                let layer: NormalizationLayer<Float> = try BatchChannelNorm<Float>(channels: 4, groups: 2)
                if grow { layer[keyPath: path].append(1.5) } else { layer[keyPath: path].removeLast() }
                let kept = layer.state
                for (values, shape) in [(x, [2, 4, 3]), ([], [0, 4, 3])] {
                    XCTAssertThrowsError(try layer.forward(values, shape: shape), "\(name) \(shape)") { error in
                        XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch, "\(name) \(shape)")
                        XCTAssertTrue((error as? BCNError)?.message.hasPrefix(name) ?? false, "\(error)")
                    }
                }
                XCTAssertEqual(layer.state, kept, name)
            }
        }
    }

    /// An x or a dy of another count than the shape's or the last output's is refused, more values as well as
    /// fewer, and changes nothing.
    func testAnInputOrAGradientOfAnotherCountIsRefused() throws {
        let layer = try BatchChannelNorm<Double>(channels: 4, groups: 2, estimate: false)
        let x = input(25, channels: 4, spatial: 3)
        XCTAssertThrowsError(try layer.forward(x, shape: [2, 4, 3])) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch)
            XCTAssertEqual((error as? BCNError)?.message, "input has 25 elements, shape [2, 4, 3] needs 24")
        }
        XCTAssertEqual(layer.numBatchesTracked, 0)
        XCTAssertEqual(layer.runningMean, [0, 0, 0, 0])
        _ = try layer.forward(Array(x.prefix(24)), shape: [2, 4, 3])
        let dy = input(25, channels: 4, spatial: 3)
        for count in [25, 23] {
            XCTAssertThrowsError(try layer.backward(Array(dy.prefix(count)))) { error in
                XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch)
                XCTAssertEqual((error as? BCNError)?.message,
                               "dy has \(count) elements, the last forward's output has 24")
            }
        }
        XCTAssertEqual(layer.gradBnWeight, [0, 0, 0, 0])
        XCTAssertEqual(layer.gradWeight, [0, 0])
    }

    /// `backward` adds to the parameter gradients until `zeroGradients()`: two backwards, of one forward and of
    /// the next, leave the sums of what each leaves on a zeroed twin.
    func testBackwardsAccumulateTheParameterGradients() throws {
        let shape = [3, 8, 5], count = 120
        let layer = try BatchChannelNorm<Double>(channels: 8, groups: 4, estimate: false)
        let twin = try BatchChannelNorm<Double>(channels: 8, groups: 4, estimate: false)
        var ref = ReferenceBCN(channels: 8, groups: 4, kind: .batch, unbiased: true)
        randomize(layer, &ref)
        try twin.load(layer.state)
        var alone: [[Double]] = []
        for _ in 0..<2 {
            let x = input(count, channels: 8, spatial: 5), dy = (0..<count).map { _ in rng.normal(0.5, 1) }
            _ = try layer.forward(x, shape: shape)
            _ = try twin.forward(x, shape: shape)
            XCTAssertEqual(try layer.backward(dy), try twin.backward(dy))
            alone.append(twin.gradBnWeight + twin.gradBnBias + twin.gradWeight + twin.gradBias)
            twin.zeroGradients()
        }
        let sums = zip(alone[0], alone[1]).map { $0 + $1 }
        XCTAssertLessThan(maxScaledError(layer.gradBnWeight + layer.gradBnBias + layer.gradWeight + layer.gradBias,
                                         sums), 1e-14)
        layer.zeroGradients()
        XCTAssertEqual(layer.gradBnWeight + layer.gradBnBias + layer.gradWeight + layer.gradBias,
                       [Double](repeating: 0, count: 24))
    }

    /// The options' own checks, called directly: channels in 1...2^32 with at least one stage, a channel-norm
    /// stage of positive channels; the ends of the range taken.
    func testPlanAndOptionsValidateTheirRanges() throws {
        func refused<R>(_ call: @autoclosure () throws -> R, _ message: String, line: UInt = #line) {
            XCTAssertThrowsError(try call(), line: line) { error in
                XCTAssertEqual((error as? BCNError)?.kind, .invalidArgument, line: line)
                XCTAssertEqual((error as? BCNError)?.message, message, line: line)
            }
        }
        refused(try ChannelNormOptions(groups: 2).validate(channels: 0), "channels must be positive, got 0")
        refused(try ChannelNormOptions(groups: 2).validate(channels: -4), "channels must be positive, got -4")
        XCTAssertNoThrow(try ChannelNormOptions(groups: 2).validate(channels: 4))
        let maximum = NormalizationPlan.maxChannels
        XCTAssertEqual(maximum, 1 << 32)
        XCTAssertNoThrow(try NormalizationPlan(channels: maximum, batchNorm: BatchNormOptions(),
                                               channelNorm: ChannelNormOptions(groups: 1)).validate())
        XCTAssertNoThrow(try NormalizationPlan(channels: 1, batchNorm: BatchNormOptions(), channelNorm: nil).validate())
        for channels in [maximum + 1, 0, -3] {
            let plan = NormalizationPlan(channels: channels, batchNorm: BatchNormOptions(), channelNorm: nil)
            refused(try plan.validate(),
                    "channels must be positive and at most 2^32, got \(channels)")
        }
        refused(try BatchNorm<Float>(channels: 0), "channels must be positive and at most 2^32, got 0")
        refused(try EstimatedBatchNorm<Double>(channels: 0), "channels must be positive and at most 2^32, got 0")
    }

    /// `NormalizationShape` refuses sizes below 1 (a negative pair of spatial sizes too, whose product is
    /// positive) and counts above Int.max / 16, and takes that count itself.
    func testShapesOutOfRangeAreRefused() throws {
        for (b, c, s) in [(0, 4, 3), (2, 0, 3), (2, 4, 0), (-2, 4, 3)] {
            XCTAssertThrowsError(try NormalizationShape(batch: b, channels: c, spatial: s)) { error in
                XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch, "[\(b), \(c), \(s)]")
            }
        }
        let most = Int.max / 16
        XCTAssertEqual(try NormalizationShape(batch: 1, channels: 1, spatial: most).count, most)
        for (b, c, s) in [(1, 1, most + 1), (1 << 30, 1 << 30, 4)] {
            XCTAssertThrowsError(try NormalizationShape(batch: b, channels: c, spatial: s)) { error in
                XCTAssertEqual((error as? BCNError)?.kind, .invalidArgument, "[\(b), \(c), \(s)]")
                XCTAssertEqual((error as? BCNError)?.message, "input of \(b) x \(c) x \(s) elements is too large")
            }
        }
        XCTAssertThrowsError(try NormalizationShape(dimensions: [2, 4, -1, -1])) { error in
            XCTAssertEqual((error as? BCNError)?.message, "input dimensions must be positive, got shape [2, 4, -1, -1]")
        }
        let layer = try BatchChannelNorm<Double>(channels: 4, groups: 2)
        XCTAssertThrowsError(try layer.forward(input(8, channels: 4, spatial: 1), shape: [2, 4, -1, -1])) { error in
            XCTAssertEqual((error as? BCNError)?.kind, .shapeMismatch)
        }
        XCTAssertEqual(layer.numBatchesTracked, 0)
    }

    /// The weight shapes `standardize` and `gradient` refuse, each in its own words: a rank below 2, a fan-in
    /// dimension below 1 (a negative pair too), a fan-in that overflows, a gradient of another count.
    func testWeightStandardizationRefusesShapesInTheirOwnWords() {
        let w = (0..<6).map { _ in rng.normal(0.2, 0.3) }
        let biased = WeightStandardizationOptions(unbiased: false)
        func message(_ call: @autoclosure () throws -> [Double]) -> (BCNError.Kind?, String?) {
            do {
                _ = try call()
                return (nil, nil)
            } catch {
                return ((error as? BCNError)?.kind, (error as? BCNError)?.message)
            }
        }
        let big = 1 << 32
        let cases: [((BCNError.Kind?, String?), BCNError.Kind, String)] = [
            (message(try WeightStandardization.standardize(w, shape: [6], options: biased)), .shapeMismatch,
             "weight must have rank >= 2 ([out_channels, ...]), got shape [6]"),
            (message(try WeightStandardization.gradient(w, w, shape: [6], options: biased)), .shapeMismatch,
             "weight must have rank >= 2 ([out_channels, ...]), got shape [6]"),
            (message(try WeightStandardization.standardize(w, shape: [3, 0])), .shapeMismatch,
             "weight dimensions must be positive, got shape [3, 0]"),
            (message(try WeightStandardization.standardize(Array(w.prefix(2)), shape: [2, -1, -1], options: biased)),
             .shapeMismatch, "weight dimensions must be positive, got shape [2, -1, -1]"),
            (message(try WeightStandardization.standardize(w, shape: [1, big, big])), .invalidArgument,
             "weight shape [1, \(big), \(big)] is too large"),
            (message(try WeightStandardization.gradient(w, Array(w.prefix(5)), shape: [2, 3])), .shapeMismatch,
             "gradient has 5 elements, the weight has 6"),
            (message(try WeightStandardization.gradient(w, w + w, shape: [2, 3])), .shapeMismatch,
             "gradient has 12 elements, the weight has 6"),
        ]
        for (got, kind, expected) in cases {
            XCTAssertEqual(got.0, kind, expected)
            XCTAssertEqual(got.1, expected)
        }
    }

    /// Without options, Weight Standardization is the documents' default: eps 1e-5 under the square root, the
    /// unbiased variance.
    func testWeightStandardizationDefaultsAreTheDocumentedOnes() throws {
        let shape = [4, 3, 3], w = (0..<36).map { _ in rng.normal(0.2, 0.05) }
        let ref = referenceWeightStandardization(w, outChannels: 4, eps: 1e-5, unbiased: true,
                                                 epsInsideSquareRoot: true)
        XCTAssertLessThan(maxScaledError(try WeightStandardization.standardize(w, shape: shape), ref), 1e-12)
        let g = (0..<36).map { _ in rng.normal(0.3, 1) }
        let explicit = WeightStandardizationOptions(eps: 1e-5, unbiased: true, epsInsideSquareRoot: true)
        XCTAssertEqual(try WeightStandardization.gradient(w, g, shape: shape),
                       try WeightStandardization.gradient(w, g, shape: shape, options: explicit))
    }
}
