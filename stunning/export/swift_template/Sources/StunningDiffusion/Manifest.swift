// resources.json: every file the app loads, with the names and shapes the exporter wrote.
import Foundation

struct TensorInfo: Decodable {
    let name: String
    let shape: [Int]
    let dtype: String
}

struct ModelEntry: Decodable {
    let packages: [String: String]   // variant ("float16", "8bit", ...) -> path relative to resources.json
    let inputs: [TensorInfo]
    let outputs: [TensorInfo]
}

struct TokenizerEntry: Decodable {
    let vocab: String                // vocab.json (token -> id)
    let merges: String               // merges.txt (BPE merges, rank order)
    let max_length: Int
    let bos_id: Int
    let eos_id: Int
    let pad_id: Int
}

struct SamplerEntry: Decodable {
    let kind: String                 // "flow-euler" (sd3) or "euler" (sd-unet, epsilon prediction)
    let timesteps: [Float]           // what the denoiser's `timestep` input gets, one per step
    let sigmas: [Float]              // steps + 1 noise levels, the last one 0
    let input_scales: [Float]        // the denoiser input is latents * input_scales[i]
    let init_noise_sigma: Float      // initial latents = standard normal noise * this
}

struct ConditioningEntry: Decodable {
    let kind: String                 // "sd3" (two CLIP encoders, padded, + zero T5 tokens) or "sd-unet"
    let encoders: [String]           // text encoder model keys, in concatenation order
    let pad_to: Int                  // hidden width after zero padding (sd3: joint attention width)
    let zero_tokens: Int             // sd3: zero tokens appended in place of T5
}

struct Manifest: Decodable {
    let format: String
    let family: String
    let resolution: Int
    let batch: Int
    let guidance_scale: Float
    let steps: Int
    let default_variant: String
    let models: [String: ModelEntry]
    let tokenizers: [String: TokenizerEntry]
    let sampler: SamplerEntry
    let conditioning: ConditioningEntry

    static func load(_ url: URL) throws -> Manifest {
        try JSONDecoder().decode(Manifest.self, from: Data(contentsOf: url))
    }

    func model(_ key: String) throws -> ModelEntry {
        guard let entry = models[key] else { throw AppError.missing("model \(key) in resources.json") }
        return entry
    }
}

enum AppError: Error, CustomStringConvertible {
    case missing(String)
    case shape(String)

    var description: String {
        switch self {
        case .missing(let what): return "not found: \(what)"
        case .shape(let what): return "unexpected shape: \(what)"
        }
    }
}
