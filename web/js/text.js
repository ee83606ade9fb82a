// text.js — token text helpers: byte-level BPE pieces → text, visible whitespace for chips, special tokens,
// HTML escaping, and word boundaries for word-level aggregation.
//
// /v1/tokenize returns the tokenizer's own pieces ("Ġis", "Ċ"). Byte-level BPE (GPT-2, Qwen, Llama 3) maps every byte
// to a printable character; pieceToText inverts that map and decodes UTF-8 (an incomplete sequence, e.g. half of a
// multi-byte character split over two tokens, shows as U+FFFD). SentencePiece's "▁" becomes a space.

const inv = (() => {
  // GPT-2 bytes_to_unicode: printable bytes map to themselves, the others to U+0100 + n in byte order.
  const m = new Map();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const keep = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    m.set(String.fromCodePoint(keep ? b : 256 + n++), b);
  }
  return m;
})();
const dec = new TextDecoder('utf-8');
const enc = new TextEncoder();

/** Text of one tokenizer piece (byte-level or SentencePiece); special tokens come back unchanged. */
export function pieceToText(piece) {
  if (piece == null) return null;
  if (isSpecial(piece)) return piece;
  const bytes = [];
  let byteLevel = true;
  for (const ch of piece) {
    const b = inv.get(ch);
    if (b !== undefined) bytes.push(b);
    else if (ch === '\u2581') bytes.push(32);
    else { byteLevel = false; for (const x of enc.encode(ch)) bytes.push(x); }
  }
  const s = dec.decode(Uint8Array.from(bytes));
  return byteLevel || s.length ? s : piece;
}

const SPECIAL = /^(<\|[^|>]{1,40}\|>|<\/?think>|<s>|<\/s>|<unk>|<pad>|\[[A-Z]{2,8}\])$/;
export function isSpecial(t) { return t != null && SPECIAL.test(t); }

/** What a chip shows: spaces as ·, newlines as ⏎, tabs as ⇥, an unknown text as #id. */
export function visible(t, id) {
  if (t == null) return id != null && id >= 0 ? `#${id}` : '?';
  if (t === '') return '∅';
  return t.replace(/ /g, '·').replace(/\n/g, '⏎').replace(/\t/g, '⇥').replace(/\r/g, '␍');
}

export function isWhitespace(t) { return t != null && t.length > 0 && /^\s+$/.test(t); }

const ESC = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
export function esc(s) { return String(s).replace(/[&<>"']/g, c => ESC[c]); }

/** Does token text t start a new word (given the previous token's text)? */
export function startsWord(t, prev) {
  if (prev == null || t == null) return true;
  if (isSpecial(t) || isSpecial(prev)) return true;
  if (/^\s/.test(t) || /\s$/.test(prev)) return true;
  // punctuation stands alone; digits and letters glue
  if (/^[^\p{L}\p{N}_']/u.test(t) || /[^\p{L}\p{N}_']$/u.test(prev)) return true;
  return false;
}
