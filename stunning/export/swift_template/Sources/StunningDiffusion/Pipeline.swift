// Text -> image with the exported Core ML packages: tokenize, encode, sample, decode.
import CoreML
import Foundation

/// A float tensor in row-major order (what flows between the packages).
struct Tensor {
    var shape: [Int]
    var values: [Float]

    init(shape: [Int], values: [Float]) { self.shape = shape; self.values = values }
    init(_ array: MLMultiArray) {
        let shaped = MLShapedArray<Float>(converting: array)  // float16 or float32 outputs alike
        shape = shaped.shape
        values = shaped.scalars
    }
    func multiArray() throws -> MLMultiArray {
        try MLMultiArray(MLShapedArray<Float>(scalars: values, shape: shape))
    }
}

/// Seeded standard normal noise (SplitMix64 + Box-Muller): reproducible on every Apple device,
/// though not the same numbers as torch's generator.
struct NormalNoise {
    private var state: UInt64
    init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }
    private mutating func uniform() -> Double {
        state = state &+ 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z = z ^ (z >> 31)
        return (Double(z >> 11) + 0.5) / Double(1 << 53)
    }
    mutating func sample(_ count: Int) -> [Float] {
        (0..<count).map { _ in Float((-2 * log(uniform())).squareRoot() * cos(2 * Double.pi * uniform())) }
    }
}

final class DiffusionPipeline {
    let manifest: Manifest
    let base: URL
    let variant: String
    private var models: [String: MLModel] = [:]
    private var tokenizers: [String: CLIPTokenizer] = [:]

    init(manifestURL: URL, variant: String?) throws {
        manifest = try Manifest.load(manifestURL)
        base = manifestURL.deletingLastPathComponent()
        self.variant = variant ?? manifest.default_variant
        for (key, entry) in manifest.tokenizers {
            tokenizers[key] = try CLIPTokenizer(entry: entry, base: base)
        }
    }

    /// The compiled model of `key` at the chosen variant (compiled once, on first use).
    func model(_ key: String) throws -> MLModel {
        if let m = models[key] { return m }
        let entry = try manifest.model(key)
        guard let rel = entry.packages[variant] ?? entry.packages["float16"] ?? entry.packages["float32"] else {
            throw AppError.missing("package \(variant) of \(key)")
        }
        let compiled = try MLModel.compileModel(at: base.appendingPathComponent(rel))
        let config = MLModelConfiguration()
        config.computeUnits = .all
        let m = try MLModel(contentsOf: compiled, configuration: config)
        models[key] = m
        return m
    }

    private func predict(_ key: String, _ inputs: [String: MLMultiArray]) throws -> [String: Tensor] {
        let entry = try manifest.model(key)
        let features = try MLDictionaryFeatureProvider(dictionary: inputs.mapValues { MLFeatureValue(multiArray: $0) })
        let out = try model(key).prediction(from: features)
        var result: [String: Tensor] = [:]
        for o in entry.outputs {
            guard let array = out.featureValue(for: o.name)?.multiArrayValue else { throw AppError.missing("output \(o.name) of \(key)") }
            result[o.name] = Tensor(array)
        }
        return result
    }

    /// (per-token embeddings, pooled vector or nil) of `prompt`, for `manifest.batch` images.
    func encode(_ prompt: String) throws -> (Tensor, Tensor?) {
        let c = manifest.conditioning
        var hidden: [Tensor] = []
        var pooled: [Tensor] = []
        for key in c.encoders {
            guard let tokenizer = tokenizers[key] else { throw AppError.missing("tokenizer of \(key)") }
            let ids = tokenizer.encode(prompt)
            let batchIds = Array((0..<manifest.batch).map { _ in ids }.joined())
            let array = try MLMultiArray(MLShapedArray<Int32>(scalars: batchIds, shape: [manifest.batch, ids.count]))
            let out = try predict(key, ["input_ids": array])
            guard let h = out["hidden_states"] else { throw AppError.missing("hidden_states of \(key)") }
            hidden.append(h)
            if let p = out["pooled"] { pooled.append(p) }
        }
        let (b, t) = (hidden[0].shape[0], hidden[0].shape[1])
        let width = max(c.pad_to, hidden.reduce(0) { $0 + $1.shape[2] })
        var embeds = [Float](repeating: 0, count: b * (t + c.zero_tokens) * width)
        for i in 0..<b {
            for j in 0..<t {
                var offset = 0
                for h in hidden {  // concatenate the encoders' features, zero padded to `width`
                    let d = h.shape[2]
                    for k in 0..<d { embeds[(i * (t + c.zero_tokens) + j) * width + offset + k] = h.values[(i * t + j) * d + k] }
                    offset += d
                }
            }
        }
        let tokens = Tensor(shape: [b, t + c.zero_tokens, width], values: embeds)
        guard !pooled.isEmpty else { return (tokens, nil) }
        let pw = pooled.reduce(0) { $0 + $1.shape[1] }
        var pv = [Float](repeating: 0, count: b * pw)
        for i in 0..<b {
            var offset = 0
            for p in pooled {
                let d = p.shape[1]
                for k in 0..<d { pv[i * pw + offset + k] = p.values[i * d + k] }
                offset += d
            }
        }
        return (tokens, Tensor(shape: [b, pw], values: pv))
    }

    /// Images in [-1, 1], (batch, 3, H, W), for `prompt` (classifier-free guidance against `negative`).
    func generate(prompt: String, negative: String = "", seed: UInt64, guidance: Float? = nil) throws -> Tensor {
        let s = manifest.sampler
        let g = guidance ?? manifest.guidance_scale
        let (cond, pooledCond) = try encode(prompt)
        let (uncond, pooledUncond) = try encode(negative)
        let denoiser = try manifest.model("denoiser")
        guard let out = denoiser.outputs.first else { throw AppError.missing("denoiser output") }
        let perImage = out.shape.dropFirst().reduce(1, *)
        let b = manifest.batch
        var noise = NormalNoise(seed: seed)
        var latents = noise.sample(b * perImage).map { $0 * s.init_noise_sigma }
        func both(_ u: Tensor, _ c: Tensor) -> Tensor {  // [unconditional; conditional], as diffusers orders them
            Tensor(shape: [u.shape[0] * 2] + Array(u.shape.dropFirst()), values: u.values + c.values)
        }
        let embeds = both(uncond, cond)
        for i in 0..<s.timesteps.count {
            let x = latents.map { $0 * s.input_scales[i] }
            var inputs: [String: MLMultiArray] = [:]
            for spec in denoiser.inputs {
                switch spec.name {
                case "timestep":
                    inputs[spec.name] = try Tensor(shape: spec.shape, values: Array(repeating: s.timesteps[i], count: spec.shape[0])).multiArray()
                case "encoder_hidden_states":
                    inputs[spec.name] = try embeds.multiArray()
                case "pooled_projections":
                    guard let pu = pooledUncond, let pc = pooledCond else { throw AppError.missing("pooled projections") }
                    inputs[spec.name] = try both(pu, pc).multiArray()
                default:  // the latent input ("hidden_states" for sd3, "sample" for the UNet)
                    guard spec.shape.count == 4 else { throw AppError.shape("denoiser input \(spec.name) \(spec.shape)") }
                    inputs[spec.name] = try Tensor(shape: spec.shape, values: x + x).multiArray()
                }
            }
            let pred = try predict("denoiser", inputs)[out.name]!.values
            let n = b * perImage
            let step = s.sigmas[i + 1] - s.sigmas[i]
            for k in 0..<n {  // guided prediction, then one Euler step in sigma
                let guided = pred[k] + g * (pred[n + k] - pred[k])
                latents[k] += step * guided
            }
        }
        let decoder = try manifest.model("vae_decoder")
        let latentShape = decoder.inputs[0].shape
        let image = try predict("vae_decoder", [decoder.inputs[0].name: Tensor(shape: latentShape, values: latents).multiArray()])
        guard let pixels = image[decoder.outputs[0].name] else { throw AppError.missing("decoded image") }
        return pixels
    }
}
