/// Reductions down the columns of a row-major block (rows of `stride` values, `columns` of them used), in Float64
/// throughout: values widen as they load, so these sums cannot overflow where `_columnSums` and
/// `_columnGradientSums` in Float32 lanes would. The channels-last layout falls back to them for such blocks.
enum ColumnKernels {
    @inline(__always)
    static func load(_ p: UnsafePointer<Double>, _ i: Int) -> SIMD4<Double> {
        UnsafeRawPointer(p + i).loadUnaligned(as: SIMD4<Double>.self)
    }

    @inline(__always)
    static func store(_ v: SIMD4<Double>, _ p: UnsafeMutablePointer<Double>, _ i: Int) {
        UnsafeMutableRawPointer(p + i).storeBytes(of: v, as: SIMD4<Double>.self)
    }

    /// sums[c] = Σ_r (x[r, c] - centre[c]) and squares[c] = Σ_r (x[r, c] - centre[c])².
    static func centredSums<T: NormalizationScalar>(_ x: UnsafePointer<T>, rows: Int, columns n: Int, stride: Int,
                                                    centre: UnsafePointer<Double>, sums: UnsafeMutablePointer<Double>,
                                                    squares: UnsafeMutablePointer<Double>) {
        var c = 0
        while c + 4 <= n {
            let k = load(centre, c)
            var s = SIMD4<Double>(), q = SIMD4<Double>()
            for r in 0..<rows {
                let d = T._load4Wide(x + r * stride, c) - k
                s += d; q.addProduct(d, d)
            }
            store(s, sums, c); store(q, squares, c)
            c += 4
        }
        while c < n {
            var s = 0.0, q = 0.0
            for r in 0..<rows { let d = Double(x[r * stride + c]) - centre[c]; s += d; q.addProduct(d, d) }
            sums[c] = s; squares[c] = q
            c += 1
        }
    }

    /// sums[c] += Σ_r dy[r, c] and dots[c] += Σ_r (dy[r, c] - dyShift[c]) (x[r, c] - centre[c]).
    static func gradientSums<T: NormalizationScalar>(_ dy: UnsafePointer<T>, _ x: UnsafePointer<T>, rows: Int,
                                                     columns n: Int, stride: Int, centre: UnsafePointer<Double>,
                                                     dyShift: UnsafePointer<Double>,
                                                     sums: UnsafeMutablePointer<Double>,
                                                     dots: UnsafeMutablePointer<Double>) {
        var c = 0
        while c + 4 <= n {
            let k = load(centre, c), h = load(dyShift, c)
            var s = SIMD4<Double>(), d = SIMD4<Double>()
            for r in 0..<rows {
                let g = T._load4Wide(dy + r * stride, c)
                s += g; d.addProduct(g - h, T._load4Wide(x + r * stride, c) - k)
            }
            store(load(sums, c) + s, sums, c); store(load(dots, c) + d, dots, c)
            c += 4
        }
        while c < n {
            var s = 0.0, d = 0.0
            for r in 0..<rows {
                let g = Double(dy[r * stride + c])
                s += g; d.addProduct(g - dyShift[c], Double(x[r * stride + c]) - centre[c])
            }
            sums[c] += s; dots[c] += d
            c += 1
        }
    }
}
