/// What one phase of a call keeps for a later phase of the same call: `.record` it into the storage, or
/// `.reuse` what an earlier phase recorded there (the same numbers, not computed again).
enum PhaseMemo<Storage> {
    case none
    case record(Storage)
    case reuse(Storage)

    var reuses: Bool { if case .reuse = self { return true } else { return false } }
}

/// Every unit's gradient in one backward: E, F, H, Σ dy₁ and Σ dy₁ (x - p) per plane (B·C values each, in that
/// order, so that [E | F | H] is already the map dx = P dy + Q (x - p) + R of a layer without a batch-norm stage),
/// and ΣT and r W per unit (its group bias's and weight's gradients). Per-plane arrays let the batch-norm stage
/// run over whole samples, C channels at a time, however few channels a group holds.
struct UnitGradients {
    let storage: UnsafeMutablePointer<Double>, planes: Int, units: Int

    static func count(planes: Int, units: Int) -> Int { 5 * planes + 2 * units }

    /// Over `count(planes:units:)` Doubles at `storage`, for the planes and units of this plan and shape.
    init(storage: UnsafeMutablePointer<Double>, plan: NormalizationPlan, shape: NormalizationShape) {
        self.init(storage: storage, planes: shape.planes, units: Units(plan: plan, shape: shape).count)
    }

    init(storage: UnsafeMutablePointer<Double>, planes: Int, units: Int) {
        self.storage = storage; self.planes = planes; self.units = units
    }

    /// [E | F | H]: 3·B·C values.
    var maps: UnsafeMutablePointer<Double> { storage }
    var sum: UnsafeMutablePointer<Double> { storage + 3 * planes }
    var dot: UnsafeMutablePointer<Double> { storage + 4 * planes }
    var biasGradient: UnsafeMutablePointer<Double> { storage + 5 * planes }

    /// r W of unit u is `weightGradient[u]`.
    var weightGradient: UnsafeMutablePointer<Double> { storage + 5 * planes + units }

    /// The arrays of the unit whose first plane is `first`.
    func gradient(first: Int) -> NormalizationUnit.Gradient {
        .init(sum: sum + first, f: storage + planes + first, h: storage + 2 * planes + first, dot: dot + first)
    }

    /// The rest of unit u's backward, once `NormalizationUnit.backward` has filled `gradient(first:)`: its E on
    /// its K planes from `first`, and its group bias's and weight's gradients.
    @inline(__always)
    func record(unit u: Int, first: Int, planes K: Int, e: Double, bias: Double, weight: Double) {
        (maps + first).update(repeating: e, count: K)
        biasGradient[u] = bias; weightGradient[u] = weight
    }
}
