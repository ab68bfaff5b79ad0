// stunning-diffusion: generate an image with the exported Core ML packages.
//
//   swift run -c release stunning-diffusion --resources resources.json --prompt "a red dress" --out out.png
import CoreGraphics
import Foundation
import ImageIO
import UniformTypeIdentifiers

func argument(_ flag: String, _ fallback: String? = nil) -> String? {
    let args = CommandLine.arguments
    if let i = args.firstIndex(of: flag), i + 1 < args.count { return args[i + 1] }
    return fallback
}

/// Save image `index` of a (batch, 3, H, W) tensor in [-1, 1] as PNG.
func savePNG(_ image: Tensor, index: Int, to url: URL) throws {
    let (h, w) = (image.shape[2], image.shape[3])
    var rgba = [UInt8](repeating: 255, count: h * w * 4)
    let plane = h * w
    let base = index * 3 * plane
    for p in 0..<plane {
        for c in 0..<3 {
            let v = (image.values[base + c * plane + p] + 1) * 127.5
            rgba[p * 4 + c] = UInt8(max(0, min(255, v.rounded())))
        }
    }
    let provider = CGDataProvider(data: Data(rgba) as CFData)!
    let cg = CGImage(width: w, height: h, bitsPerComponent: 8, bitsPerPixel: 32, bytesPerRow: w * 4,
                     space: CGColorSpaceCreateDeviceRGB(), bitmapInfo: CGBitmapInfo(rawValue: CGImageAlphaInfo.noneSkipLast.rawValue),
                     provider: provider, decode: nil, shouldInterpolate: false, intent: .defaultIntent)!
    guard let dest = CGImageDestinationCreateWithURL(url as CFURL, UTType.png.identifier as CFString, 1, nil) else {
        throw AppError.missing("a writable \(url.path)")
    }
    CGImageDestinationAddImage(dest, cg, nil)
    guard CGImageDestinationFinalize(dest) else { throw AppError.missing("PNG encoder for \(url.path)") }
}

do {
    let manifestURL = URL(fileURLWithPath: argument("--resources", "resources.json")!)
    let pipeline = try DiffusionPipeline(manifestURL: manifestURL, variant: argument("--variant"))
    let prompt = argument("--prompt", "a red dress on a white background")!
    let seed = UInt64(argument("--seed", "0")!) ?? 0
    let guidance = argument("--guidance-scale").flatMap { Float($0) }
    let out = argument("--out", "image.png")!
    let image = try pipeline.generate(prompt: prompt, negative: argument("--negative", "")!, seed: seed, guidance: guidance)
    for i in 0..<image.shape[0] {
        let url = image.shape[0] == 1 ? URL(fileURLWithPath: out)
            : URL(fileURLWithPath: out).deletingPathExtension().appendingPathExtension("\(i).png")
        try savePNG(image, index: i, to: url)
        print("saved \(url.path) (\(pipeline.manifest.family), \(pipeline.variant), \(pipeline.manifest.steps) steps)")
    }
} catch {
    FileHandle.standardError.write("stunning-diffusion: \(error)\n".data(using: .utf8)!)
    exit(1)
}
