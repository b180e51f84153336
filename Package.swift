// swift-tools-version:6.0
// Tuning flags (CPU features, exclusivity checking) are deliberately absent: SwiftPM refuses unsafeFlags in a
// package that others depend on by URL. setup.py passes them on the `swift build` command line instead.
import PackageDescription

let package = Package(
    name: "BCNSwift",
    products: [
        // The Swift API: `import BCNSwift`.
        .library(name: "BCNSwift", targets: ["BCNSwift"]),
        // The C ABI (`@_cdecl` exports), as a static library the Python extension links.
        .library(name: "BCNSwiftC", type: .static, targets: ["BCNSwiftC"]),
    ],
    targets: [
        .target(name: "BCNSwift"),
        .target(
            name: "BCNSwiftC",
            dependencies: ["BCNSwift"],
            exclude: ["include"]
        ),
        .target(name: "BCNSwiftTestSupport", path: "Tests/BCNSwiftTestSupport"),
        .testTarget(name: "BCNSwiftTests", dependencies: ["BCNSwift", "BCNSwiftC", "BCNSwiftTestSupport"]),
    ]
)
