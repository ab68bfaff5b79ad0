// CLIP's byte-level BPE tokenizer, reading the exported vocab.json and merges.txt.
import Foundation

final class CLIPTokenizer {
    private let vocab: [String: Int]
    private let ranks: [String: Int]          // "a b" -> merge rank
    private let byteToUnicode: [UInt8: Character]
    private let entry: TokenizerEntry
    private let pattern = try! NSRegularExpression(
        pattern: "<\\|startoftext\\|>|<\\|endoftext\\|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+",
        options: [.caseInsensitive])

    init(entry: TokenizerEntry, base: URL) throws {
        self.entry = entry
        let vocabData = try Data(contentsOf: base.appendingPathComponent(entry.vocab))
        vocab = try JSONDecoder().decode([String: Int].self, from: vocabData)
        let lines = try String(contentsOf: base.appendingPathComponent(entry.merges), encoding: .utf8)
            .split(separator: "\n").filter { !$0.hasPrefix("#version") }
        var r: [String: Int] = [:]
        for (i, line) in lines.enumerated() { r[String(line)] = i }
        ranks = r
        // GPT-2's reversible byte -> printable character table.
        var bytes = Array(33...126) + Array(161...172) + Array(174...255)
        var chars = bytes
        var n = 0
        for b in 0..<256 where !bytes.contains(b) {
            bytes.append(b); chars.append(256 + n); n += 1
        }
        var table: [UInt8: Character] = [:]
        for (b, c) in zip(bytes, chars) { table[UInt8(b)] = Character(UnicodeScalar(c)!) }
        byteToUnicode = table
    }

    /// Token ids padded to max_length: bos, the prompt's tokens (truncated), eos, padding.
    func encode(_ text: String) -> [Int32] {
        let cleaned = text.precomposedStringWithCanonicalMapping
            .replacingOccurrences(of: "\\s+", with: " ", options: .regularExpression)
            .trimmingCharacters(in: .whitespaces).lowercased()
        var ids: [Int] = []
        let ns = cleaned as NSString
        for match in pattern.matches(in: cleaned, range: NSRange(location: 0, length: ns.length)) {
            let word = String(Array(ns.substring(with: match.range).utf8).map { byteToUnicode[$0]! })
            for piece in bpe(word) { ids.append(vocab[piece] ?? entry.eos_id) }
        }
        let body = Array(ids.prefix(entry.max_length - 2))
        var out = [entry.bos_id] + body + [entry.eos_id]
        out += Array(repeating: entry.pad_id, count: entry.max_length - out.count)
        return out.map { Int32($0) }
    }

    private func bpe(_ word: String) -> [String] {
        var parts = word.map { String($0) }
        guard !parts.isEmpty else { return [] }
        parts[parts.count - 1] += "</w>"
        while parts.count > 1 {
            var best: (rank: Int, index: Int)? = nil
            for i in 0..<(parts.count - 1) {
                if let rank = ranks["\(parts[i]) \(parts[i + 1])"], rank < (best?.rank ?? Int.max) {
                    best = (rank, i)
                }
            }
            guard let (_, i) = best else { break }
            let merged = parts[i] + parts[i + 1]
            let pair = (parts[i], parts[i + 1])
            var next: [String] = []
            var j = 0
            while j < parts.count {  // merge every occurrence of the best pair, left to right
                if j < parts.count - 1 && parts[j] == pair.0 && parts[j + 1] == pair.1 {
                    next.append(merged); j += 2
                } else {
                    next.append(parts[j]); j += 1
                }
            }
            parts = next
        }
        return parts
    }
}
