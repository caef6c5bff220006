// A small reader of the TOML a service definition is written in (the keys of a
// `[services.NAME]` table, as in docs/services.md): `key = value` lines, `[table]` and
// `[a.b]` headers, dotted and quoted keys, basic and literal strings (also multi-line),
// integers, floats, booleans, arrays (over several lines too) and inline tables; `#`
// comments. Dates and arrays of tables are not read. `parseDefinition` takes JSON first.

export class ParseError extends Error {}

export function parseDefinition(text) {
  const trimmed = text.trim();
  if (trimmed === "") throw new ParseError("the definition is empty");
  if (trimmed.startsWith("{")) {
    try {
      return JSON.parse(trimmed);
    } catch (error) {
      throw new ParseError(`not valid JSON: ${error.message}`);
    }
  }
  return parseToml(text);
}

export function parseToml(text) {
  const reader = new Reader(text);
  const root = {};
  let table = root;
  for (;;) {
    reader.skipBlank();
    if (reader.done()) return root;
    if (reader.peek() === "[") {
      reader.next();
      if (reader.peek() === "[") reader.fail("arrays of tables are not supported");
      const path = reader.key();
      reader.skipSpaces();
      reader.expect("]");
      table = descend(root, path, reader);
    } else {
      const path = reader.key();
      reader.skipSpaces();
      reader.expect("=");
      reader.skipSpaces();
      assign(table, path, reader.value(), reader);
    }
    reader.endOfLine();
  }
}

function descend(root, path, reader) {
  let table = root;
  for (const part of path) {
    if (!(part in table)) table[part] = {};
    else if (!isTable(table[part])) reader.fail(`${part} is not a table`);
    table = table[part];
  }
  return table;
}

function assign(table, path, value, reader) {
  const parent = descend(table, path.slice(0, -1), reader);
  const last = path[path.length - 1];
  if (last in parent) reader.fail(`${path.join(".")} is given twice`);
  parent[last] = value;
}

function isTable(value) {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

const BARE = /[A-Za-z0-9_-]/;
const ESCAPES = { b: "\b", t: "\t", n: "\n", f: "\f", r: "\r", '"': '"', "\\": "\\" };

class Reader {
  constructor(text) {
    this.text = text.replace(/\r\n/g, "\n");
    this.at = 0;
  }

  done() { return this.at >= this.text.length; }
  peek(offset = 0) { return this.text[this.at + offset]; }
  next() { return this.text[this.at++]; }
  startsWith(s) { return this.text.startsWith(s, this.at); }

  fail(message) {
    const line = this.text.slice(0, this.at).split("\n").length;
    throw new ParseError(`line ${line}: ${message}`);
  }

  expect(char) {
    if (this.peek() !== char) this.fail(`expected ${char}`);
    this.next();
  }

  skipSpaces() {
    while (this.peek() === " " || this.peek() === "\t") this.next();
  }

  skipComment() {
    if (this.peek() === "#") while (!this.done() && this.peek() !== "\n") this.next();
  }

  // Spaces, newlines and comments (between statements, inside arrays).
  skipBlank() {
    for (;;) {
      this.skipSpaces();
      this.skipComment();
      if (this.peek() === "\n") this.next();
      else return;
    }
  }

  endOfLine() {
    this.skipSpaces();
    this.skipComment();
    if (this.done()) return;
    if (this.peek() !== "\n") this.fail("expected the end of the line");
    this.next();
  }

  key() {
    const parts = [];
    for (;;) {
      this.skipSpaces();
      const c = this.peek();
      if (c === '"') parts.push(this.basicString());
      else if (c === "'") parts.push(this.literalString());
      else {
        let name = "";
        while (!this.done() && BARE.test(this.peek())) name += this.next();
        if (name === "") this.fail("expected a key");
        parts.push(name);
      }
      this.skipSpaces();
      if (this.peek() !== ".") return parts;
      this.next();
    }
  }

  value() {
    const c = this.peek();
    if (this.startsWith('"""')) return this.multiline('"""', true);
    if (this.startsWith("'''")) return this.multiline("'''", false);
    if (c === '"') return this.basicString();
    if (c === "'") return this.literalString();
    if (c === "[") return this.array();
    if (c === "{") return this.inlineTable();
    if (this.startsWith("true")) { this.at += 4; return true; }
    if (this.startsWith("false")) { this.at += 5; return false; }
    return this.number();
  }

  number() {
    const match = /^[+-]?(inf|nan|[0-9_]+(\.[0-9_]+)?([eE][+-]?[0-9_]+)?|0x[0-9A-Fa-f_]+)/
      .exec(this.text.slice(this.at));
    if (!match) this.fail("expected a value");
    this.at += match[0].length;
    const raw = match[0].replace(/_/g, "");
    if (/inf$/.test(raw)) return raw.startsWith("-") ? -Infinity : Infinity;
    if (/nan$/.test(raw)) return NaN;
    return Number(raw);
  }

  escape() {
    const c = this.next();
    if (c in ESCAPES) return ESCAPES[c];
    if (c === "u" || c === "U") {
      const length = c === "u" ? 4 : 8;
      const hex = this.text.slice(this.at, this.at + length);
      if (!/^[0-9A-Fa-f]+$/.test(hex) || hex.length !== length) this.fail("bad \\u escape");
      this.at += length;
      return String.fromCodePoint(parseInt(hex, 16));
    }
    return this.fail(`unknown escape \\${c}`);
  }

  basicString() {
    this.expect('"');
    let out = "";
    for (;;) {
      if (this.done() || this.peek() === "\n") this.fail("unterminated string");
      const c = this.next();
      if (c === '"') return out;
      out += c === "\\" ? this.escape() : c;
    }
  }

  literalString() {
    this.expect("'");
    const end = this.text.indexOf("'", this.at);
    const newline = this.text.indexOf("\n", this.at);
    if (end < 0 || (newline >= 0 && newline < end)) this.fail("unterminated string");
    const out = this.text.slice(this.at, end);
    this.at = end + 1;
    return out;
  }

  multiline(quote, escapes) {
    this.at += 3;
    if (this.peek() === "\n") this.next(); // a newline right after the quotes is trimmed
    let out = "";
    for (;;) {
      if (this.done()) this.fail("unterminated string");
      if (this.startsWith(quote)) {
        this.at += 3;
        return out;
      }
      const c = this.next();
      if (escapes && c === "\\") {
        if (this.peek() === "\n" || this.peek() === " ") {
          while (/[ \t\n]/.test(this.peek() ?? "")) this.next(); // a line-ending backslash
        } else {
          out += this.escape();
        }
      } else {
        out += c;
      }
    }
  }

  array() {
    this.expect("[");
    const out = [];
    for (;;) {
      this.skipBlank();
      if (this.peek() === "]") { this.next(); return out; }
      out.push(this.value());
      this.skipBlank();
      if (this.peek() === ",") this.next();
      else if (this.peek() !== "]") this.fail("expected , or ] in an array");
    }
  }

  inlineTable() {
    this.expect("{");
    const out = {};
    this.skipSpaces();
    if (this.peek() === "}") { this.next(); return out; }
    for (;;) {
      const path = this.key();
      this.skipSpaces();
      this.expect("=");
      this.skipSpaces();
      assign(out, path, this.value(), this);
      this.skipSpaces();
      if (this.peek() === "}") { this.next(); return out; }
      this.expect(",");
    }
  }
}
