//! Host patterns: the part of regex syntax a host layout needs, compiled once at configure time
//! and matched by a bounded backtracker.
//!
//! Not a regex engine: in a module one costs size, memory and load time (docs/design.md), and a
//! host layout needs little of it. The tests check this matcher against regex-lite on the same
//! patterns: same texts accepted, same groups captured.
//!
//! Syntax: literals; `.`; `\d \w \s` and their negations; `\` before punctuation; classes such
//! as `[a-z0-9-]` and `[^.]`; groups `(?P<name>...)`, `(?<name>...)` and `(?:...)`; `|`;
//! `* + ? {n} {n,} {n,m}` and their lazy forms (`*?` ...); `^` and `$`. Every pattern is
//! anchored at both ends and ASCII case-insensitive, and matches as the regex crate's would
//! (leftmost-first). Hosts are ASCII: a byte outside ASCII matches nothing.
//!
//! Texts are at most `MAX_TEXT` bytes and the matcher never visits an (instruction, position)
//! pair twice, so a match costs at most the pattern's size times the text's length, whatever the
//! pattern: no catastrophic backtracking on hosts a client chose.

/// The longest text matched (a DNS name has at most 253 bytes); longer texts do not match.
pub const MAX_TEXT: usize = 253;
/// The most instructions a pattern compiles to (counted repetitions are expanded).
const MAX_PROGRAM: usize = 4096;
/// The largest count in `{n,m}`.
const MAX_COUNT: u32 = 255;
/// The deepest nesting of groups.
const MAX_DEPTH: usize = 32;

/// A set of ASCII bytes: bit `b` for byte `b`.
type Set = u128;

const DIGIT: Set = range(b'0', b'9');
const WORD: Set = DIGIT | range(b'a', b'z') | range(b'A', b'Z') | 1 << b'_';
const SPACE: Set = range(b'\t', b'\r') | 1 << b' ';
const ANY: Set = !(1 << b'\n');

const fn range(from: u8, to: u8) -> Set {
    (Set::MAX >> (127 - to)) & (Set::MAX << from)
}

/// Adds the other case of every ASCII letter in the set.
const fn fold(set: Set) -> Set {
    let upper = set & range(b'A', b'Z');
    let lower = set & range(b'a', b'z');
    set | upper << 32 | lower >> 32
}

/// A compiled pattern.
#[derive(Debug)]
pub struct Pattern {
    program: Vec<Inst>,
    names: Vec<String>,
}

#[derive(Debug, Clone, Copy)]
enum Inst {
    /// One byte in the set.
    Byte(Set),
    /// Go on at the first; if that fails, at the second.
    Split(u32, u32),
    Jump(u32),
    /// Records the position in a capture slot.
    Save(u32),
    Start,
    End,
    Match,
}

/// Per-VM matching space, so that a match allocates nothing.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    /// One bit per (instruction, position) already explored.
    visited: Vec<u64>,
    stack: Vec<Frame>,
    /// Start and end of each group, `u32::MAX` when it did not take part.
    slots: Vec<u32>,
}

#[derive(Debug, Clone, Copy)]
enum Frame {
    Explore(u32, u32),
    Restore(u32, u32),
}

impl Pattern {
    /// Compiles a pattern; the error says what is wrong and where.
    pub fn new(pattern: &str) -> Result<Self, String> {
        let mut parser = Parser { text: pattern.as_bytes(), at: 0, names: Vec::new(), depth: 0 };
        let node = parser.alternation()?;
        if parser.at < pattern.len() {
            return Err(parser.error("unmatched `)`"));
        }
        let mut program = Vec::new();
        compile(&node, &mut program)?;
        program.push(Inst::Match);
        Ok(Pattern { program, names: parser.names })
    }

    /// The names of the groups, in the order they open.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    pub fn scratch(&self) -> Scratch {
        let bits = self.program.len() * (MAX_TEXT + 1);
        Scratch { visited: vec![0; bits.div_ceil(64)], stack: Vec::new(), slots: vec![u32::MAX; 2 * self.names.len()] }
    }

    /// Whether the whole text matches; on a match the groups are read with `group`.
    pub fn matches(&self, text: &str, scratch: &mut Scratch) -> bool {
        let text = text.as_bytes();
        if text.len() > MAX_TEXT {
            return false;
        }
        let width = text.len() + 1;
        let words = (self.program.len() * width).div_ceil(64);
        let (Some(visited), Ok(width)) = (scratch.visited.get_mut(..words), u32::try_from(width)) else {
            return false;
        };
        visited.fill(0);
        scratch.slots.fill(u32::MAX);
        scratch.stack.clear();
        scratch.stack.push(Frame::Explore(0, 0));
        while let Some(frame) = scratch.stack.pop() {
            let (mut pc, mut at) = match frame {
                Frame::Explore(pc, at) => (pc, at),
                Frame::Restore(slot, old) => {
                    if let Some(s) = scratch.slots.get_mut(slot as usize) {
                        *s = old;
                    }
                    continue;
                }
            };
            loop {
                let bit = (pc * width + at) as usize;
                let Some(word) = visited.get_mut(bit / 64) else { break };
                if *word & 1 << (bit % 64) != 0 {
                    break;
                }
                *word |= 1 << (bit % 64);
                match self.program.get(pc as usize) {
                    Some(Inst::Byte(set)) => match text.get(at as usize) {
                        Some(&b) if b < 128 && set >> b & 1 == 1 => (pc, at) = (pc + 1, at + 1),
                        _ => break,
                    },
                    Some(&Inst::Split(first, second)) => {
                        scratch.stack.push(Frame::Explore(second, at));
                        pc = first;
                    }
                    Some(&Inst::Jump(to)) => pc = to,
                    Some(&Inst::Save(slot)) => {
                        let Some(s) = scratch.slots.get_mut(slot as usize) else { break };
                        scratch.stack.push(Frame::Restore(slot, *s));
                        *s = at;
                        pc += 1;
                    }
                    Some(Inst::Start) if at == 0 => pc += 1,
                    Some(Inst::End) if at as usize == text.len() => pc += 1,
                    Some(Inst::Match) if at as usize == text.len() => return true,
                    _ => break,
                }
            }
        }
        false
    }

    /// The byte range of group `i` (in `names` order) after a match; `None` when it did not take
    /// part.
    pub fn group(&self, i: usize, scratch: &Scratch) -> Option<(usize, usize)> {
        match (scratch.slots.get(2 * i), scratch.slots.get(2 * i + 1)) {
            (Some(&start), Some(&end)) if start != u32::MAX && end != u32::MAX => Some((start as usize, end as usize)),
            _ => None,
        }
    }
}

enum Node {
    Byte(Set),
    Start,
    End,
    Group(u32, Box<Node>),
    Concat(Vec<Node>),
    Alternate(Vec<Node>),
    Repeat { node: Box<Node>, min: u32, max: Option<u32>, greedy: bool },
}

impl Node {
    fn can_be_empty(&self) -> bool {
        match self {
            Node::Byte(_) => false,
            Node::Start | Node::End => true,
            Node::Group(_, node) => node.can_be_empty(),
            Node::Concat(items) => items.iter().all(Node::can_be_empty),
            Node::Alternate(branches) => branches.iter().any(Node::can_be_empty),
            Node::Repeat { node, min, .. } => *min == 0 || node.can_be_empty(),
        }
    }
}

struct Parser<'a> {
    text: &'a [u8],
    at: usize,
    names: Vec<String>,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, what: &str) -> String {
        format!("at offset {}: {what}", self.at)
    }

    fn peek(&self) -> Option<u8> {
        self.text.get(self.at).copied()
    }

    fn eat(&mut self, b: u8) -> bool {
        let found = self.peek() == Some(b);
        self.at += usize::from(found);
        found
    }

    fn next(&mut self) -> Result<u8, String> {
        let b = self.peek().ok_or_else(|| self.error("unexpected end"))?;
        if !b.is_ascii() {
            return Err(self.error("hosts are ASCII: non-ASCII character"));
        }
        self.at += 1;
        Ok(b)
    }

    fn alternation(&mut self) -> Result<Node, String> {
        let mut branches = vec![self.concat()?];
        while self.eat(b'|') {
            branches.push(self.concat()?);
        }
        Ok(match branches.len() {
            1 => branches.pop().unwrap_or(Node::Concat(Vec::new())),
            _ => Node::Alternate(branches),
        })
    }

    fn concat(&mut self) -> Result<Node, String> {
        let mut items = Vec::new();
        // Whether the last item may take a repetition (not an assertion, not a repetition).
        let mut repeatable = false;
        while let Some(b) = self.peek() {
            let item = match b {
                b'|' | b')' => break,
                b'*' | b'+' | b'?' | b'{' => {
                    let (min, max) = self.repetition()?;
                    let greedy = !self.eat(b'?');
                    let Some(node) = items.pop().filter(|_| repeatable) else {
                        return Err(self.error("nothing to repeat before the repetition"));
                    };
                    items.push(Node::Repeat { node: Box::new(node), min, max, greedy });
                    repeatable = false;
                    continue;
                }
                b'^' | b'$' => {
                    self.at += 1;
                    repeatable = false;
                    items.push(if b == b'^' { Node::Start } else { Node::End });
                    continue;
                }
                b'(' => self.group()?,
                b'[' => Node::Byte(fold(self.class()?)),
                b'.' => {
                    self.at += 1;
                    Node::Byte(ANY)
                }
                b'\\' => Node::Byte(fold(self.escape()?)),
                b']' | b'}' => return Err(self.error("unescaped `]` or `}`")),
                _ => Node::Byte(fold(1 << self.next()?)),
            };
            items.push(item);
            repeatable = true;
        }
        Ok(if items.len() == 1 { items.pop().unwrap_or(Node::Concat(Vec::new())) } else { Node::Concat(items) })
    }

    /// `*`, `+`, `?` or `{n}`, `{n,}`, `{n,m}`: the bounds.
    #[inline(never)]
    fn repetition(&mut self) -> Result<(u32, Option<u32>), String> {
        match self.next()? {
            b'*' => return Ok((0, None)),
            b'+' => return Ok((1, None)),
            b'?' => return Ok((0, Some(1))),
            _ => {}
        }
        let min = self.count()?;
        let max = match self.eat(b',') {
            false => Some(min),
            true if self.peek() == Some(b'}') => None,
            true => Some(self.count()?),
        };
        if !self.eat(b'}') {
            return Err(self.error("unclosed counted repetition"));
        }
        if max.is_some_and(|max| max < min) {
            return Err(self.error("counted repetition with min > max"));
        }
        if max == Some(0) {
            return Err(self.error("a repetition of zero times; leave the part out"));
        }
        Ok((min, max))
    }

    fn count(&mut self) -> Result<u32, String> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.at += 1;
        }
        let digits = std::str::from_utf8(self.text.get(start..self.at).unwrap_or_default()).unwrap_or_default();
        match digits.parse::<u32>() {
            Ok(n) if n <= MAX_COUNT => Ok(n),
            Ok(_) => Err(self.error(&format!("counts above {MAX_COUNT} are not supported"))),
            Err(_) => Err(self.error("expected a number in the counted repetition")),
        }
    }

    /// `(?:...)`, `(?P<name>...)` or `(?<name>...)`.
    // The parser's steps stay out of `concat`: large functions cost Envoy memory to compile.
    #[inline(never)]
    fn group(&mut self) -> Result<Node, String> {
        self.at += 1;
        if !self.eat(b'?') {
            return Err(self.error("a plain group; use (?:...) for groups that are not part of the route key"));
        }
        let name = if self.eat(b':') {
            None
        } else if self.eat(b'<') || (self.eat(b'P') && self.eat(b'<')) {
            Some(self.name()?)
        } else {
            return Err(
                self.error("flags are not supported (patterns are always case-insensitive); groups are (?:...), (?P<name>...) or (?<name>...)")
            );
        };
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(self.error(&format!("groups nested deeper than {MAX_DEPTH}")));
        }
        let index = name.map(|name| {
            self.names.push(name);
            self.names.len() - 1
        });
        let node = self.alternation()?;
        self.depth -= 1;
        if !self.eat(b')') {
            return Err(self.error("unclosed group"));
        }
        Ok(match index.map(u32::try_from) {
            Some(Ok(i)) => Node::Group(i, Box::new(node)),
            Some(Err(_)) => return Err(self.error("too many groups")),
            None => node,
        })
    }

    fn name(&mut self) -> Result<String, String> {
        let start = self.at;
        while self.peek().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_') {
            self.at += 1;
        }
        let name = String::from_utf8_lossy(self.text.get(start..self.at).unwrap_or_default()).into_owned();
        if !self.eat(b'>') || name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
            return Err(self.error("a group name is a letter or `_`, then letters, digits or `_`, then `>`"));
        }
        if self.names.contains(&name) {
            return Err(self.error(&format!("duplicate group name `{name}`")));
        }
        Ok(name)
    }

    /// `[...]` or `[^...]`.
    #[inline(never)]
    fn class(&mut self) -> Result<Set, String> {
        self.at += 1;
        let negated = self.eat(b'^');
        let mut set: Set = 0;
        let mut empty = true;
        // Leading `-` are literal, as in the regex crate (`[--a]` is `-` and `a`, not a range).
        while self.eat(b'-') {
            set |= 1 << b'-';
            empty = false;
        }
        loop {
            // The regex crate's class set operations: refused, not read as ranges or literals.
            if let Some(op @ (b"--" | b"&&" | b"~~")) = self.text.get(self.at..self.at + 2) {
                let op = String::from_utf8_lossy(op);
                return Err(self.error(&format!("class set operations ({op}) are not supported; escape the character")));
            }
            let from = match self.peek() {
                Some(b']') if !empty => {
                    self.at += 1;
                    break;
                }
                Some(b']') => return Err(self.error("empty class; use \\] for `]`")),
                Some(b'[') => return Err(self.error("nested classes are not supported; use \\[ for `[`")),
                Some(b'\\') => match self.escape()? {
                    one if one.count_ones() == 1 => one.trailing_zeros() as u8,
                    perl => {
                        if self.peek() == Some(b'-') && self.text.get(self.at + 1) != Some(&b']') {
                            return Err(self.error("a range is between two characters"));
                        }
                        set |= perl;
                        empty = false;
                        continue;
                    }
                },
                _ => self.next()?,
            };
            empty = false;
            // `-` is a range between two bytes, and itself first or last (or before `-`, refused
            // above).
            if self.peek() != Some(b'-') || matches!(self.text.get(self.at + 1), Some(b']' | b'-')) {
                set |= 1 << from;
                continue;
            }
            self.at += 1;
            let to = match self.peek() {
                Some(b'\\') => match self.escape()? {
                    one if one.count_ones() == 1 => one.trailing_zeros() as u8,
                    _ => return Err(self.error("a range is between two characters")),
                },
                _ => self.next()?,
            };
            if to < from {
                return Err(self.error("range out of order"));
            }
            set |= range(from, to);
        }
        Ok(if negated { !fold(set) } else { set })
    }

    /// `\d \D \w \W \s \S`, or punctuation taken literally.
    fn escape(&mut self) -> Result<Set, String> {
        self.at += 1;
        Ok(match self.next()? {
            b'd' => DIGIT,
            b'D' => !DIGIT,
            b'w' => WORD,
            b'W' => !WORD,
            b's' => SPACE,
            b'S' => !SPACE,
            b if b.is_ascii_punctuation() && b != b'<' && b != b'>' => 1 << b,
            _ => {
                return Err(
                    self.error("unsupported escape (supported: \\d \\w \\s, their negations, \\ before punctuation)")
                )
            }
        })
    }
}

/// Emits the instructions of a node: a byte, a group's saves, or the splits and jumps of
/// alternations and repetitions (a counted repetition is its node repeated).
fn compile(node: &Node, program: &mut Vec<Inst>) -> Result<(), String> {
    if program.len() > MAX_PROGRAM {
        return Err(format!("too large (more than {MAX_PROGRAM} instructions once repetitions are expanded)"));
    }
    let here = |program: &Vec<Inst>| program.len() as u32;
    match node {
        Node::Byte(set) => program.push(Inst::Byte(*set)),
        Node::Start => program.push(Inst::Start),
        Node::End => program.push(Inst::End),
        Node::Group(i, node) => {
            program.push(Inst::Save(2 * i));
            compile(node, program)?;
            program.push(Inst::Save(2 * i + 1));
        }
        Node::Concat(items) => {
            for item in items {
                compile(item, program)?;
            }
        }
        Node::Alternate(branches) => {
            let mut jumps = Vec::new();
            for (n, branch) in branches.iter().enumerate() {
                let split = program.len();
                let last = n + 1 == branches.len();
                if !last {
                    program.push(Inst::Split(here(program) + 1, 0));
                }
                compile(branch, program)?;
                if !last {
                    jumps.push(program.len());
                    program.push(Inst::Jump(0));
                    let next = here(program);
                    if let Some(Inst::Split(_, second)) = program.get_mut(split) {
                        *second = next;
                    }
                }
            }
            let end = here(program);
            for jump in jumps {
                if let Some(Inst::Jump(to)) = program.get_mut(jump) {
                    *to = end;
                }
            }
        }
        Node::Repeat { node, min, max, greedy } => {
            // Splits prefer one more repetition when greedy, the rest of the pattern when lazy;
            // `end` is patched in once known.
            let split = |program: &mut Vec<Inst>, more: u32| {
                program.push(if *greedy { Inst::Split(more, u32::MAX) } else { Inst::Split(u32::MAX, more) });
            };
            let mut splits = Vec::new();
            match max {
                // The shapes the regex crate compiles, so that the same paths meet (and are cut
                // short) at the same instructions and the same groups come out: x* is one split
                // looping over x, or (?:x+)? when x can match nothing (a loop through the same
                // split would then not prefer an empty x the way leftmost-first does); x{n,} is
                // x{n-1} then x followed by a split back.
                None if *min == 0 && !node.can_be_empty() => {
                    let top = program.len();
                    splits.push(top);
                    split(program, here(program) + 1);
                    compile(node, program)?;
                    program.push(Inst::Jump(top as u32));
                }
                None => {
                    for _ in 1..*min {
                        compile(node, program)?;
                    }
                    if *min == 0 {
                        splits.push(program.len());
                        split(program, here(program) + 1);
                    }
                    let again = here(program);
                    compile(node, program)?;
                    splits.push(program.len());
                    split(program, again);
                }
                // Nested optionals: x{2,4} is xx(?:x(?:x)?)?.
                Some(max) => {
                    for _ in 0..*min {
                        compile(node, program)?;
                    }
                    for _ in *min..*max {
                        splits.push(program.len());
                        split(program, here(program) + 1);
                        compile(node, program)?;
                    }
                }
            }
            let end = here(program);
            for s in splits {
                if let Some(Inst::Split(a, b)) = program.get_mut(s) {
                    for target in [a, b] {
                        if *target == u32::MAX {
                            *target = end;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This matcher and regex-lite (anchored, case-insensitive) on one pattern and text: whether
    /// they match, and every group's range.
    fn agree(pattern: &str, texts: &[&str]) {
        let ours = Pattern::new(pattern).unwrap_or_else(|e| panic!("{pattern}: {e}"));
        let theirs = regex_lite::RegexBuilder::new(&format!("^(?:{pattern})$"))
            .case_insensitive(true)
            .build()
            .unwrap_or_else(|e| panic!("regex-lite refuses {pattern}: {e}"));
        let names: Vec<&str> = theirs.capture_names().flatten().collect();
        assert_eq!(ours.names().iter().map(String::as_str).collect::<Vec<_>>(), names, "{pattern}");
        let mut scratch = ours.scratch();
        for text in texts {
            let expected = theirs.captures(text);
            let matched = ours.matches(text, &mut scratch);
            assert_eq!(matched, expected.is_some(), "{pattern} on {text:?}");
            if let Some(caps) = expected {
                for (i, name) in names.iter().enumerate() {
                    let want = caps.name(name).map(|m| (m.start(), m.end()));
                    assert_eq!(ours.group(i, &scratch), want, "{pattern} on {text:?}, group {name}");
                }
            }
        }
    }

    #[test]
    fn host_layouts_match_as_regex_lite_does() {
        agree(
            "(?P<function>[a-z0-9]+(?:-[a-z0-9]+)*)-(?P<cluster>[0-9a-f]{14})(?P<environment>[0-9a-f]+)-(?:[a-z0-9-]+)",
            &[
                "my-func-a1b2c3d4e5f6072a-production",
                "my-func-a1b2c3d4e5f6072a-prod-eu-1",
                "f-A1B2C3D4E5F6072A-x",
                "a-b-c-0123456789abcdef-z",
                "my-func-a1b2c3d4e5f607-production",
                "my-func",
                "-a1b2c3d4e5f6072a-x",
                "",
            ],
        );
        agree(
            "(?P<project>[0-9a-f]{8})-(?P<environment>[0-9a-f]{8})-(?P<function>[0-9a-f]{10})",
            &["0000000a-0000000b-000000000c", "0000000A-0000000B-000000000C", "0000000a-0000000b-000000000", "é"],
        );
        agree(
            r"(?<tenant>\w+?)(?:-v(?P<version>\d{1,3}))?\.(?P<region>eu|us|ap)\d*",
            &["shop-v12.eu", "shop.us3", "shop-v1234.eu", "a_b-v1.AP07", "shop-v.eu", "shop.eu.x"],
        );
        agree(r"^(?P<a>[^.\s]+)\.(?:x|y|)(?P<b>.*)$", &["a.xb", "a.b", "a.", ".x", "a b.x", "a.x.y.z"]);
        agree(r"(?P<a>[\-\]a]+|[z-z]{2,}?)(?P<b>[^\W\d]*)", &["-]a", "zzz", "zz_", "a9", "]x_y"]);
        // Leading dashes are literal, not a range from `-` (found by fuzzing).
        agree("(?P<a>[--a]+)(?P<b>[^-0]*)", &["-", "a", "--a-", "-0", "0", "b", "-b"]);
        agree("(?P<a>[-a-c-]+)", &["-", "b-", "abc", "d"]);
    }

    #[test]
    fn refused_patterns_say_why() {
        let cases = [
            ("(", "use (?:...)"),
            ("(x)", "use (?:...)"),
            ("(?:x", "unclosed group"),
            ("x)", "unmatched `)`"),
            ("(?i)x", "flags are not supported"),
            ("(?P<1a>x)", "a group name"),
            ("(?P<a>x)(?P<a>y)", "duplicate group name `a`"),
            ("*x", "nothing to repeat"),
            ("x**", "nothing to repeat"),
            ("^*", "nothing to repeat"),
            ("x{2", "unclosed counted repetition"),
            ("x{3,2}", "min > max"),
            ("(?P<a>x){0}", "zero times"),
            ("x{256}", "counts above 255"),
            ("x{a}", "expected a number"),
            ("[]", "empty class"),
            ("[a", "unexpected end"),
            ("[[:alpha:]]", "nested classes"),
            ("[z-a]", "out of order"),
            ("[a-z--x]", "class set operations (--)"),
            ("[a--]", "class set operations (--)"),
            ("[-a--b]", "class set operations (--)"),
            ("[a&&b]", "class set operations (&&)"),
            ("[^~~]", "class set operations (~~)"),
            (r"[\d-z]", "a range"),
            (r"[a-\d]", "a range"),
            (r"\b", "unsupported escape"),
            (r"\<", "unsupported escape"),
            ("é", "hosts are ASCII"),
            ("]", "unescaped"),
            ("[a-z]{255}[a-z]{255}[a-z]{255}(?:x{255}){255}", "too large"),
        ];
        for (pattern, want) in cases {
            let err = Pattern::new(pattern).err().unwrap_or_else(|| panic!("{pattern} accepted"));
            assert!(err.contains(want), "{pattern}: {err}");
        }
        let deep = format!("{}x{}", "(?:".repeat(MAX_DEPTH + 1), ")".repeat(MAX_DEPTH + 1));
        assert!(Pattern::new(&deep).is_err_and(|e| e.contains("nested deeper")));
    }

    #[test]
    fn every_escapable_byte_is_what_regex_lite_says() {
        for b in 0x20u8..0x7f {
            let pattern = format!(r"(?P<x>\{})", b as char);
            let theirs = regex_lite::Regex::new(&pattern);
            let ours = Pattern::new(&pattern);
            // The perl classes aside, an escape we accept is a literal regex-lite accepts too.
            if ours.is_ok() {
                assert!(theirs.is_ok(), "{pattern}");
                if !b"dDwWsS".contains(&b) {
                    agree(&pattern, &[&(b as char).to_string(), "x"]);
                }
            }
            // regex-lite reads \< and \> as word boundaries, which hosts do not need.
            if theirs.is_ok() && b.is_ascii_punctuation() && b != b'<' && b != b'>' {
                assert!(ours.is_ok(), "{pattern}");
            }
        }
    }

    #[test]
    fn pathological_patterns_stay_linear() {
        // (a+)+b against a's: exponential for a plain backtracker.
        let p = Pattern::new("(?P<x>(?:a+)+)b").unwrap();
        let mut s = p.scratch();
        let text = "a".repeat(MAX_TEXT);
        assert!(!p.matches(&text, &mut s));
        assert!(!p.matches(&"a".repeat(MAX_TEXT + 1), &mut s), "longer than a DNS name");
        agree("(?P<x>(?:a*)*)(?:b|)", &["", "a", "aab", "aaaa"]);
    }

    /// Random patterns from the supported syntax over a small alphabet, and random texts:
    /// the same answers and groups as regex-lite.
    #[test]
    fn random_patterns_agree_with_regex_lite() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        fn pattern(next: &mut impl FnMut(usize) -> usize, depth: usize, groups: &mut usize) -> String {
            let atoms = ["a", "b", "A", "-", ".", r"\d", r"\w", "[ab]", "[^a]", "[a-b0]", r"\.", "0"];
            let mut out = String::new();
            for _ in 0..1 + next(3) {
                let mut atom = match next(if depth > 2 { 1 } else { 5 }) {
                    0 => atoms[next(atoms.len())].to_string(),
                    1 => format!("(?:{})", pattern(next, depth + 1, groups)),
                    2 => {
                        *groups += 1;
                        let name = format!("g{groups}");
                        format!("(?P<{name}>{})", pattern(next, depth + 1, groups))
                    }
                    3 => format!("(?:{}|{})", pattern(next, depth + 1, groups), pattern(next, depth + 1, groups)),
                    _ => format!("(?:{}|)", pattern(next, depth + 1, groups)),
                };
                let reps =
                    ["", "", "", "*", "+", "?", "{2}", "{1,2}", "{0,}", "*?", "+?", "??", "{1,3}?", "{2,}", "{0,2}?"];
                atom.push_str(reps[next(reps.len())]);
                out.push_str(&atom);
                match next(16) {
                    0 => out.push('^'),
                    1 => out.push('$'),
                    _ => {}
                }
            }
            if next(8) == 0 {
                out.insert(0, '^');
            }
            if next(8) == 0 {
                out.push('$');
            }
            out
        }
        let alphabet = ['a', 'b', 'A', 'B', '-', '.', '0', '_'];
        for _ in 0..2000 {
            let mut groups = 0;
            let p = pattern(&mut next, 0, &mut groups);
            let texts: Vec<String> =
                (0..24).map(|_| (0..next(7)).map(|_| alphabet[next(alphabet.len())]).collect()).collect();
            let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
            agree(&p, &texts);
        }
    }
}
