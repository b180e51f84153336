/// The memory layout a shape takes, chosen from its format and plane length alone.
enum Layout {
    /// [B, C, S] with S ≥ `smallPlane`: per-plane SIMD kernels.
    case planes(PlanesLayout)
    /// [B, C, S] with S < `smallPlane`, or channels-last with S = 1 (the same memory): nothing kept per plane.
    case rows(RowsLayout)
    /// [B, S, C] with S ≥ 2: kernels vectorized across channels.
    case channelsLast(ChannelsLastLayout)

    init(plan: NormalizationPlan, shape: NormalizationShape) {
        if shape.format == .channelsLast && shape.spatial > 1 {
            self = .channelsLast(ChannelsLastLayout(shape: shape))
        } else if shape.spatial < smallPlane {
            self = .rows(RowsLayout(plan: plan, shape: shape))
        } else {
            self = .planes(PlanesLayout(shape: shape))
        }
    }

    /// True when each unit can measure its own planes right before mapping them (planes short enough to map
    /// one at a time), which forward calls without batch statistics use to read x from memory once.
    var measuresPerUnit: Bool {
        if case .planes(let l) = self { return l.mapsPerPlane }
        return false
    }

    /// Doubles of the plane moments a single call's phase (a) keeps for its phase (c): only the rows layout,
    /// which keeps none in the context (`RowsLayout.momentsMemoCount`).
    func momentsMemoCount<T: NormalizationScalar>(_: T.Type, plan: NormalizationPlan) -> Int {
        if case .rows(let l) = self { return l.momentsMemoCount(T.self, plan: plan) }
        return 0
    }
}
