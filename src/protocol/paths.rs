//! docarray v1 access paths (`@r`, `@c`, `@m`, `@cm`, `@r,c`, `@c[:2]`, ...): which documents of a
//! request an endpoint works on. Documents are addressed by position so the request can be
//! updated in place after the model has run.

use super::docarray::DocumentProto;

/// One step down the document tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Step {
    Chunk(usize),
    Match(usize),
}

/// Where a document is: the root index and the steps below it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address {
    pub root: usize,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Chunks,
    Matches,
}

/// Python-style `[start:stop]` or `[i]` on one level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Slice {
    start: Option<i64>,
    stop: Option<i64>,
    single: bool,
}

impl Slice {
    const ALL: Slice = Slice {
        start: None,
        stop: None,
        single: false,
    };

    fn range(&self, len: usize) -> std::ops::Range<usize> {
        let n = len as i64;
        let norm = |v: i64| if v < 0 { (n + v).max(0) } else { v.min(n) };
        if self.single {
            let i = self.start.unwrap_or(0);
            let i = if i < 0 { n + i } else { i };
            return if (0..n).contains(&i) {
                i as usize..i as usize + 1
            } else {
                0..0
            };
        }
        let a = self.start.map_or(0, norm);
        let b = self.stop.map_or(n, norm);
        a as usize..(b.max(a)) as usize
    }
}

/// The longest access-path expression read.
pub const MAX_PATHS_BYTES: usize = 256;
/// The most paths one expression holds (after duplicates are dropped).
pub const MAX_PATHS: usize = 16;

/// A parsed access-path expression: comma-separated paths, each a sequence of levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPaths(Vec<Vec<(Level, Slice)>>);

impl AccessPaths {
    /// `@r`: the root documents.
    pub fn root() -> Self {
        Self(vec![vec![(Level::Root, Slice::ALL)]])
    }

    /// Parses `@r`, `@c`, `@m`, `@cm`, `@r,c`, `@c[:3]`, `@m[-1]`; the `@` is optional. At most
    /// [`MAX_PATHS_BYTES`] long and [`MAX_PATHS`] paths: every path walks every document, and a
    /// parameter of 64 MB of `r,` took gigabytes to parse and minutes to walk.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() > MAX_PATHS_BYTES {
            return Err(format!(
                "invalid access path: {} bytes long, at most {MAX_PATHS_BYTES} are read",
                s.len()
            ));
        }
        let bad = |why: &str| format!("invalid access path {s:?}: {why}");
        let body = s.strip_prefix('@').unwrap_or(s);
        let mut paths = Vec::new();
        for part in body.split(',') {
            let part = part.trim();
            if part.is_empty() {
                return Err(bad("empty path"));
            }
            let mut levels = Vec::new();
            let mut chars = part.char_indices().peekable();
            while let Some((_, c)) = chars.next() {
                let level = match c {
                    'r' => Level::Root,
                    'c' => Level::Chunks,
                    'm' => Level::Matches,
                    other => return Err(bad(&format!("unknown level {other:?} (use r, c or m)"))),
                };
                if level == Level::Root && !levels.is_empty() {
                    return Err(bad("`r` can only start a path"));
                }
                let mut slice = Slice::ALL;
                if let Some(&(i, '[')) = chars.peek() {
                    let close = part[i..].find(']').ok_or_else(|| bad("unclosed ["))? + i;
                    slice = parse_slice(&part[i + 1..close]).map_err(|e| bad(&e))?;
                    while chars.peek().is_some_and(|&(j, _)| j <= close) {
                        chars.next();
                    }
                }
                levels.push((level, slice));
            }
            if !paths.contains(&levels) {
                paths.push(levels);
            }
        }
        if paths.len() > MAX_PATHS {
            return Err(bad(&format!("{} paths, at most {MAX_PATHS}", paths.len())));
        }
        Ok(Self(paths))
    }

    /// Every addressed document, path by path, in document order; each at most once.
    pub fn select(&self, docs: &[DocumentProto]) -> Vec<Address> {
        let mut out = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for path in &self.0 {
            let (first, rest) = match path.split_first() {
                Some(((Level::Root, slice), rest)) => (*slice, rest),
                _ => (Slice::ALL, &path[..]),
            };
            let mut current: Vec<(Address, &DocumentProto)> = docs[first.range(docs.len())]
                .iter()
                .enumerate()
                .map(|(i, d)| {
                    let root = first.range(docs.len()).start + i;
                    (
                        Address {
                            root,
                            steps: Vec::new(),
                        },
                        d,
                    )
                })
                .collect();
            for (level, slice) in rest {
                let mut next = Vec::new();
                for (addr, doc) in &current {
                    let (kids, step): (&[DocumentProto], fn(usize) -> Step) = match level {
                        Level::Chunks => (&doc.chunks, Step::Chunk),
                        Level::Matches => (&doc.matches, Step::Match),
                        Level::Root => continue,
                    };
                    let range = slice.range(kids.len());
                    for (k, d) in kids[range.clone()].iter().enumerate() {
                        let mut a = addr.clone();
                        a.steps.push(step(range.start + k));
                        next.push((a, d));
                    }
                }
                current = next;
            }
            for (a, _) in current {
                if seen.insert(a.clone()) {
                    out.push(a);
                }
            }
        }
        out
    }
}

fn parse_slice(s: &str) -> Result<Slice, String> {
    let num = |t: &str| -> Result<Option<i64>, String> {
        let t = t.trim();
        if t.is_empty() {
            Ok(None)
        } else {
            t.parse()
                .map(Some)
                .map_err(|_| format!("{t:?} is not an integer"))
        }
    };
    match s.split_once(':') {
        Some((a, b)) => Ok(Slice {
            start: num(a)?,
            stop: num(b)?,
            single: false,
        }),
        None => Ok(Slice {
            start: Some(num(s)?.ok_or("empty []")?),
            stop: None,
            single: true,
        }),
    }
}

/// The document at `addr`.
pub fn get<'a>(docs: &'a [DocumentProto], addr: &Address) -> Option<&'a DocumentProto> {
    let mut d = docs.get(addr.root)?;
    for s in &addr.steps {
        d = match s {
            Step::Chunk(i) => d.chunks.get(*i)?,
            Step::Match(i) => d.matches.get(*i)?,
        };
    }
    Some(d)
}

/// The document at `addr`, mutably.
pub fn get_mut<'a>(docs: &'a mut [DocumentProto], addr: &Address) -> Option<&'a mut DocumentProto> {
    let mut d = docs.get_mut(addr.root)?;
    for s in &addr.steps {
        d = match s {
            Step::Chunk(i) => d.chunks.get_mut(*i)?,
            Step::Match(i) => d.matches.get_mut(*i)?,
        };
    }
    Some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(id: &str, chunks: Vec<DocumentProto>, matches: Vec<DocumentProto>) -> DocumentProto {
        DocumentProto {
            id: id.into(),
            chunks,
            matches,
            ..Default::default()
        }
    }

    fn tree() -> Vec<DocumentProto> {
        vec![
            doc(
                "a",
                vec![
                    doc("a.c0", vec![], vec![doc("a.c0.m0", vec![], vec![])]),
                    doc("a.c1", vec![], vec![]),
                ],
                vec![doc("a.m0", vec![], vec![])],
            ),
            doc(
                "b",
                vec![],
                vec![doc("b.m0", vec![], vec![]), doc("b.m1", vec![], vec![])],
            ),
        ]
    }

    fn ids(p: &str) -> Vec<String> {
        let docs = tree();
        AccessPaths::parse(p)
            .map(|a| a.select(&docs))
            .map(|addrs| {
                addrs
                    .iter()
                    .filter_map(|a| get(&docs, a))
                    .map(|d| d.id.clone())
                    .collect()
            })
            .unwrap_or_else(|e| vec![e])
    }

    #[test]
    fn paths_select_like_docarray() {
        assert_eq!(ids("@r"), ["a", "b"]);
        assert_eq!(ids("r"), ["a", "b"]);
        assert_eq!(ids("@c"), ["a.c0", "a.c1"]);
        assert_eq!(ids("@m"), ["a.m0", "b.m0", "b.m1"]);
        assert_eq!(ids("@cm"), ["a.c0.m0"]);
        assert_eq!(ids("@r,m"), ["a", "b", "a.m0", "b.m0", "b.m1"]);
        assert_eq!(ids("@r,c"), ["a", "b", "a.c0", "a.c1"]);
        assert_eq!(ids("@r[:1]"), ["a"]);
        assert_eq!(ids("@r[-1]"), ["b"]);
        assert_eq!(ids("@m[1:]"), ["b.m1"]);
        assert_eq!(ids("@rc"), ["a.c0", "a.c1"]);
        assert_eq!(ids("@r,r"), ["a", "b"]);
    }

    #[test]
    fn bad_paths_are_errors() {
        for p in ["@x", "@", "@r,", "@c[", "@c[a:b]", "@cr"] {
            assert!(AccessPaths::parse(p).is_err(), "{p}");
        }
    }

    #[test]
    fn access_paths_are_bounded() {
        // Long or many paths are refused, without echoing the whole parameter.
        let long = "r,".repeat(1_000_000);
        let err = AccessPaths::parse(&long).err().unwrap_or_default();
        assert!(err.contains("at most 256") && err.len() < 200, "{err}");
        let many: Vec<String> = (0..17).map(|i| format!("c[{i}]")).collect();
        let err = AccessPaths::parse(&many.join(","))
            .err()
            .unwrap_or_default();
        assert!(err.contains("17 paths, at most 16"), "{err}");
        // Repeats count once and select once.
        let paths = AccessPaths::parse(&["r"; 100].join(",")).map_err(|e| e.to_string());
        assert_eq!(paths, Ok(AccessPaths::root()));
        let at_limit = "c,".repeat(127) + "m";
        assert_eq!(at_limit.len(), 255);
        assert!(AccessPaths::parse(&at_limit).is_ok());
    }

    #[test]
    fn addresses_reach_nested_documents_mutably() {
        let mut docs = tree();
        let addrs = AccessPaths::parse("@cm")
            .map(|a| a.select(&docs))
            .unwrap_or_default();
        assert_eq!(addrs.len(), 1);
        if let Some(d) = get_mut(&mut docs, &addrs[0]) {
            d.uri = "x".into();
        }
        assert_eq!(docs[0].chunks[0].matches[0].uri, "x");
    }
}
