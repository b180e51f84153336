// swift-tools-version:6.0
// Tuning flags (CPU features, exclusivity checking) are deliberately absent: SwiftPM refuses unsafeFlags in a
// package that others depend on by URL. setup.py passes them on the `swift build` command line instead.
import PackageDescription

let package = Package(
    name: "BCNSwift",
    // Synchronization's Atomic, which the thread pool's state words are, needs these (Linux has no floor). Built
    // and tested on Linux only.
    platforms: [.macOS(.v15), .iOS(.v18), .tvOS(.v18), .watchOS(.v11), .visionOS(.v2)],
    products: [
        // The Swift API: `import BCNSwift`.
        .library(name: "BCNSwift", targets: ["BCNSwift"]),
        // The C ABI (`@_cdecl` exports of include/bcnswift.h), as a static library the Python extension links.
        .library(name: "BCNSwiftC", type: .static, targets: ["BCNSwiftC"]),
    ],
    targets: [
        .target(name: "BCNSwift"),
        // bcnswift.h: the C ABI's declarations, flags and status codes, defined once.
        .target(name: "CBCNSwift"),
        .target(name: "BCNSwiftC", dependencies: ["BCNSwift", "CBCNSwift"]),
        .target(name: "BCNSwiftTestSupport", path: "Tests/BCNSwiftTestSupport"),
        .testTarget(name: "BCNSwiftTests",
                    dependencies: ["BCNSwift", "BCNSwiftC", "CBCNSwift", "BCNSwiftTestSupport"]),
    ]
)
