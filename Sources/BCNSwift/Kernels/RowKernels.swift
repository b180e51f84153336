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

    /// y = offset + scale (y - mean), in place.
    @inlinable
    static func scaleShift(_ y: UnsafeMutablePointer<Double>, _ n: Int, mean: Double, scale: Double, offset: Double) {
        let m = SIMD4(repeating: mean), s = SIMD4(repeating: scale), o = SIMD4(repeating: offset)
        var i = 0
        while i + 4 <= n {
            var v = o
            v.addProduct(load(y, i) - m, s)
            store(v, y, i)
            i += 4
        }
        while i < n { y[i] = offset.addingProduct(y[i] - mean, scale); i += 1 }
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
