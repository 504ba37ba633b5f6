//! Where each value of a JSON text starts, by the path the plugins name in their errors
//! (`rules[0].limit.requests`), so an error can point at its line.

/// The 1-based line inside `text` of the value at `path`, or of the nearest enclosing value that
/// exists (a missing field is reported on its object). `None` for the root or a text that
/// does not parse.
pub fn line_of(text: &str, path: &str) -> Option<usize> {
    let mut scan = Scan {
        b: text.as_bytes(),
        i: 0,
        line: 1,
        seen: Vec::new(),
    };
    scan.value(String::new(), None)?;
    let mut p = path;
    while !p.is_empty() {
        if let Some((_, line)) = scan.seen.iter().find(|(s, _)| s == p) {
            return Some(*line);
        }
        p = parent(p);
    }
    None
}

/// `a.b[2]` → `a.b` → `a` → ``.
fn parent(p: &str) -> &str {
    let cut = if p.ends_with(']') {
        p.rfind('[')
    } else {
        p.rfind('.')
    };
    cut.and_then(|c| p.get(..c)).unwrap_or("")
}

struct Scan<'a> {
    b: &'a [u8],
    i: usize,
    line: usize,
    seen: Vec<(String, usize)>,
}

impl Scan<'_> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn space(&mut self) {
        while let Some(c) = self.peek() {
            if !c.is_ascii_whitespace() {
                break;
            }
            if c == b'\n' {
                self.line += 1;
            }
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        self.space();
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// A member is reported on its key's line.
    fn value(&mut self, path: String, key_line: Option<usize>) -> Option<()> {
        self.space();
        let line = key_line.unwrap_or(self.line);
        let first = self.peek()?;
        self.seen.push((path.clone(), line));
        match first {
            b'{' => {
                self.i += 1;
                self.space();
                if self.peek()? == b'}' {
                    self.i += 1;
                    return Some(());
                }
                loop {
                    self.space();
                    let key_line = self.line;
                    let key = self.string()?;
                    self.eat(b':')?;
                    let child = if path.is_empty() {
                        key
                    } else {
                        format!("{path}.{key}")
                    };
                    self.value(child, Some(key_line))?;
                    self.space();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b'}' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'[' => {
                self.i += 1;
                self.space();
                if self.peek()? == b']' {
                    self.i += 1;
                    return Some(());
                }
                let mut n = 0usize;
                loop {
                    self.value(format!("{path}[{n}]"), None)?;
                    n += 1;
                    self.space();
                    match self.peek()? {
                        b',' => self.i += 1,
                        b']' => {
                            self.i += 1;
                            return Some(());
                        }
                        _ => return None,
                    }
                }
            }
            b'"' => self.string().map(drop),
            _ => {
                while let Some(c) = self.peek() {
                    if c.is_ascii_whitespace() || matches!(c, b',' | b']' | b'}') {
                        break;
                    }
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    /// A string token, decoded (JSON strings hold no raw line breaks).
    fn string(&mut self) -> Option<String> {
        let start = self.i;
        (self.peek()? == b'"').then_some(())?;
        self.i += 1;
        loop {
            match self.peek()? {
                b'\\' => self.i += 2,
                b'"' => {
                    self.i += 1;
                    break;
                }
                _ => self.i += 1,
            }
        }
        serde_json::from_slice(self.b.get(start..self.i)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::line_of;

    #[test]
    fn paths_resolve_to_the_line_of_their_key_or_item() {
        let text = "{\n  \"rules\": [\n    {\n      \"name\": \"a\",\n      \"limit\": {\n        \"requests\": 0\n      }\n    }\n  ],\n  \"x\\\"y\": 1\n}\n";
        assert_eq!(line_of(text, "rules"), Some(2));
        assert_eq!(line_of(text, "rules[0]"), Some(3));
        assert_eq!(line_of(text, "rules[0].limit.requests"), Some(6));
        assert_eq!(line_of(text, "rules[0].limit.window"), Some(5));
        assert_eq!(line_of(text, "x\"y"), Some(10));
        assert_eq!(line_of(text, "configuration"), None);
    }
}
