// swift-tools-version:5.9
// The Stunning Engine's Core ML app template: loads the exported packages, tokenizes the prompt,
// runs the family's sampler and saves a PNG. Build: `swift build -c release` (see README.md).
import PackageDescription

let package = Package(
    name: "StunningDiffusion",
    platforms: [.macOS(.v14), .iOS(.v17)],
    products: [.executable(name: "stunning-diffusion", targets: ["StunningDiffusion"])],
    targets: [
        .executableTarget(name: "StunningDiffusion", path: "Sources/StunningDiffusion")
    ]
)
