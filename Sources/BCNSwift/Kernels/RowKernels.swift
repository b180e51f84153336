/// Element-wise maps of the row path ([B, C] input) on Float64 buffers, four lanes at a time. LLVM does not
/// vectorize the equivalent scalar loops (their index arithmetic is overflow-checked), so they are spelled out.
@usableFromInline
enum RowKernels {
    @inlinable @inline(__always)
    static func load(_ p: UnsafePointer<Double>, _ i: Int) -> SIMD4<Double> {
        UnsafeRawPointer(p + i).loadUnaligned(as: SIMD4<Double>.self)
    }

    @inlinable @inline(__always)
    static func store(_ v: SIMD4<Double>, _ p: UnsafeMutablePointer<Double>, _ i: Int) {
        UnsafeMutableRawPointer(p + i).storeBytes(of: v, as: SIMD4<Double>.self)
    }

    /// d = Double(s) element by element (a plain loop the vectorizer handles).
    @inlinable
    static func widen<T: NormalizationScalar>(_ s: UnsafePointer<T>, _ d: UnsafeMutablePointer<Double>, _ n: Int) {
        for k in 0..<n { d[k] = Double(s[k]) }
    }

    /// d = T(s) element by element.
    @inlinable
    static func narrow<T: NormalizationScalar>(_ s: UnsafePointer<Double>, _ d: UnsafeMutablePointer<T>, _ n: Int) {
        for k in 0..<n { d[k] = T(s[k]) }
    }

    /// y = β + a (x - μ).
    @inlinable
    static func affine(_ x: UnsafePointer<Double>, _ a: UnsafePointer<Double>, _ mu: UnsafePointer<Double>,
                       _ beta: UnsafePointer<Double>, _ y: UnsafeMutablePointer<Double>, _ n: Int) {
        var i = 0
        while i + 4 <= n {
            var v = load(beta, i)
            v.addProduct(load(x, i) - load(mu, i), load(a, i))
            store(v, y, i)
            i += 4
        }
        while i < n { y[i] = beta[i].addingProduct(x[i] - mu[i], a[i]); i += 1 }
    }

    /// y₁ = β + a (x - μ) of values i..<i+4 from the input, in Float64: the one definition the row forward's
    /// passes share, so a value's y₁ is the same fused operation wherever it is computed.
    @inlinable @inline(__always)
    static func affine4<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, _ a: UnsafePointer<Double>, _ mu: UnsafePointer<Double>,
        _ beta: UnsafePointer<Double>, _ i: Int
    ) -> SIMD4<Double> {
        var v = load(beta, i)
        v.addProduct(T._load4Wide(x, i) - load(mu, i), load(a, i))
        return v
    }

    /// y₁ of value i alone, the same operations as `affine4`.
    @inlinable @inline(__always)
    static func affine1<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, _ a: UnsafePointer<Double>, _ mu: UnsafePointer<Double>,
        _ beta: UnsafePointer<Double>, _ i: Int
    ) -> Double {
        beta[i].addingProduct(Double(x[i]) - mu[i], a[i])
    }

    /// Moments of y₁ = β + a (x - μ) over n values of a row, computed from x as it is, without storing y₁:
    /// one pass shifted by the mean of the first four y₁ and kept under the rule of `Float._chunkMoments`
    /// ((Σd)²/n at most half of Σd²), else a corrected second pass around the mean found. Every y₁ is the same
    /// fused operation (`affine4`, `affine1`) in both passes and in `affineOutput`.
    @inlinable
    static func affineMoments<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, _ a: UnsafePointer<Double>, _ mu: UnsafePointer<Double>,
        _ beta: UnsafePointer<Double>, _ n: Int
    ) -> Moments {
        @inline(__always) func y4(_ i: Int) -> SIMD4<Double> { affine4(x, a, mu, beta, i) }
        @inline(__always) func y1(_ i: Int) -> Double { affine1(x, a, mu, beta, i) }
        /// (Σ (y₁ - c), Σ (y₁ - c)²)
        @inline(__always) func sums(_ c: Double) -> (Double, Double) {
            let cv = SIMD4(repeating: c)
            var s0 = SIMD4<Double>(), s1 = SIMD4<Double>(), q0 = SIMD4<Double>(), q1 = SIMD4<Double>()
            var i = 0
            while i + 8 <= n {
                let d0 = y4(i) - cv, d1 = y4(i + 4) - cv
                s0 += d0; s1 += d1; q0.addProduct(d0, d0); q1.addProduct(d1, d1)
                i += 8
            }
            var s = Double._hsum(s0 + s1), q = Double._hsum(q0 + q1)
            while i < n { let d = y1(i) - c; s += d; q.addProduct(d, d); i += 1 }
            return (s, q)
        }
        if n == 0 { return Moments() }
        let m = Double(n), invM = 1 / m
        var c: Double
        if n >= 8 {
            c = Double._hsum(y4(0)) * 0.25
        } else {
            c = 0
            for i in 0..<n { c += y1(i) }
            c *= invM
        }
        let (d, q) = sums(c)
        let m2 = q - d * d * invM
        if n >= 8 && !(q.isFinite && m2 >= 0.5 * q) {  // the shift was far from the mean: once more around it
            c += d * invM
            let (d2, q2) = sums(c)
            return Moments(count: m, mean: c + d2 * invM, m2: Swift.max(q2 - d2 * d2 * invM, 0))
        }
        return Moments(count: m, mean: c + d * invM, m2: Swift.max(m2, 0))
    }

    /// out = T(offset + scale (y₁ - mean)) with y₁ = β + a (x - μ) as in `affineMoments`. `out` may alias `x`.
    @inlinable
    static func affineOutput<T: NormalizationScalar>(
        _ x: UnsafePointer<T>, _ a: UnsafePointer<Double>, _ mu: UnsafePointer<Double>,
        _ beta: UnsafePointer<Double>, _ n: Int, mean: Double, scale: Double, offset: Double,
        into out: UnsafeMutablePointer<T>
    ) {
        let mv = SIMD4(repeating: mean), sv = SIMD4(repeating: scale), ov = SIMD4(repeating: offset)
        var i = 0
        while i + 4 <= n {
            var v = ov
            v.addProduct(affine4(x, a, mu, beta, i) - mv, sv)
            T._store4Narrow(v, out, i)
            i += 4
        }
        while i < n {
            out[i] = T(offset.addingProduct(affine1(x, a, mu, beta, i) - mean, scale))
            i += 1
        }
    }

    /// With d = rw·g + hc - r3 (y₁ - mean) (the channel-norm backward): s1 += d, s2 += d (x - μ).
    @inlinable
    static func accumulate(g: UnsafePointer<Double>, y1: UnsafePointer<Double>, x: UnsafePointer<Double>,
                           mu: UnsafePointer<Double>, rw: Double, hc: Double, r3: Double, mean: Double,
                           s1: UnsafeMutablePointer<Double>, s2: UnsafeMutablePointer<Double>, _ n: Int) {
        let k = DyCoefficients(rw: rw, hc: hc, r3: r3, mean: mean)
        var i = 0
        while i + 4 <= n {
            let d = k.dy1(g, y1, i)
            store(load(s1, i) + d, s1, i)
            var t = load(s2, i)
            t.addProduct(d, load(x, i) - load(mu, i))
            store(t, s2, i)
            i += 4
        }
        while i < n {
            let d = k.dy1(g[i], y1[i])
            s1[i] += d
            s2[i].addProduct(d, x[i] - mu[i])
            i += 1
        }
    }

    /// out = a ((d - s1) - (x - μ) s2) with d as in `accumulate`; out = d when `a` is nil.
    @inlinable
    static func finish(g: UnsafePointer<Double>, y1: UnsafePointer<Double>, x: UnsafePointer<Double>,
                       mu: UnsafePointer<Double>, a: UnsafePointer<Double>?, s1: UnsafePointer<Double>,
                       s2: UnsafePointer<Double>, rw: Double, hc: Double, r3: Double, mean: Double,
                       out: UnsafeMutablePointer<Double>, _ n: Int) {
        let k = DyCoefficients(rw: rw, hc: hc, r3: r3, mean: mean)
        var i = 0
        while i + 4 <= n {
            let d = k.dy1(g, y1, i)
            if let a {
                var v = d - load(s1, i)
                v.addProduct(-(load(x, i) - load(mu, i)), load(s2, i))
                store(load(a, i) * v, out, i)
            } else {
                store(d, out, i)
            }
            i += 4
        }
        while i < n {
            let d = k.dy1(g[i], y1[i])
            if let a { out[i] = a[i] * ((d - s1[i]) - (x[i] - mu[i]) * s2[i]) } else { out[i] = d }
            i += 1
        }
    }

    /// The channel-norm backward of one value, dy₁ = rw·dy + hc - r3 (y₁ - mean), four lanes or one at a time
    /// (the same fused operations, so a value's result does not depend on its position).
    @usableFromInline
    struct DyCoefficients {
        @usableFromInline let rw: Double, hc: Double, r3: Double, mean: Double
        @usableFromInline let vrw: SIMD4<Double>, vhc: SIMD4<Double>, vr3: SIMD4<Double>, vm: SIMD4<Double>

        @inlinable
        init(rw: Double, hc: Double, r3: Double, mean: Double) {
            self.rw = rw; self.hc = hc; self.r3 = r3; self.mean = mean
            vrw = SIMD4(repeating: rw); vhc = SIMD4(repeating: hc); vr3 = SIMD4(repeating: -r3)
            vm = SIMD4(repeating: mean)
        }

        @inlinable @inline(__always)
        func dy1(_ g: UnsafePointer<Double>, _ y1: UnsafePointer<Double>, _ i: Int) -> SIMD4<Double> {
            var d = vhc
            d.addProduct(vrw, RowKernels.load(g, i))
            d.addProduct(vr3, RowKernels.load(y1, i) - vm)
            return d
        }

        @inlinable @inline(__always)
        func dy1(_ g: Double, _ y1: Double) -> Double {
            hc.addingProduct(rw, g).addingProduct(-r3, y1 - mean)
        }
    }
}
