//! The shape of vmm's source, checked on every test run:
//! - the import graph of `vmm/src` (one node per top-level module, an edge
//!   for every `crate::` path, `use crate::{..}` groups and exported macros
//!   included) has no cycle: every cycle found is printed, and one through
//!   `cli` is named as such;
//! - no function on the fault path, in the vCPU loop or in building a VM
//!   is longer than 80 lines (the same count as the before-stop hook: from
//!   `fn` to the line where its braces balance).
//!
//!     cargo test --release -p vkvm --test shape -- --nocapture   # prints the graph

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file belongs to (`main` for the crate root).
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(src()).unwrap();
    let first = rel.components().next().unwrap().as_os_str().to_string_lossy().into_owned();
    first.trim_end_matches(".rs").to_string()
}

/// The text without `//` comments (doc comments mention modules freely).
fn code(text: &str) -> String {
    text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n")
}

fn ident_at(s: &str) -> String {
    s.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect()
}

/// The first path segment after every `prefix` in `code`, and every
/// segment of a `prefix{a, b::c}` group.
fn segments_after(code: &str, prefix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices(prefix) {
        let before = code[..i].chars().last();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let rest = &code[i + prefix.len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let body = &group[..group.find('}').unwrap_or(group.len())];
            out.extend(body.split(',').map(|p| ident_at(p.trim())).filter(|s| !s.is_empty()));
        } else {
            out.push(ident_at(rest));
        }
    }
    out
}

/// Module -> the modules it uses.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    // `#[macro_export]` macros live at the crate root: map them to their module.
    let mut macros = BTreeMap::new();
    for f in &files {
        let text = code(&std::fs::read_to_string(f).unwrap());
        for (i, _) in text.match_indices("#[macro_export]") {
            if let Some(j) = text[i..].find("macro_rules!") {
                let name = ident_at(text[i + j + "macro_rules!".len()..].trim_start());
                macros.insert(name, module_of(f));
            }
        }
    }
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for f in &files {
        let from = module_of(f);
        let text = code(&std::fs::read_to_string(f).unwrap());
        // Relative paths (`super::`, `self::`) stay inside a module: the
        // files of vmm use them only in their test modules.
        for t in segments_after(&text, "crate::").into_iter().filter(|t| !t.is_empty()) {
            let to = if modules.contains(&t) {
                t
            } else if let Some(m) = macros.get(&t) {
                m.clone()
            } else {
                // An item of the crate root (main.rs).
                "main".to_string()
            };
            if to != from {
                graph.get_mut(&from).unwrap().insert(to);
            }
        }
    }
    graph
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> T<'a> {
        fn visit(&mut self, v: &'a str) {
            let i = self.index.len();
            self.index.insert(v, i);
            self.low.insert(v, i);
            self.stack.push(v);
            self.on.insert(v);
            for w in &self.g[v] {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let l = self.low[v].min(self.low[w]);
                    self.low.insert(v, l);
                } else if self.on.contains(w) {
                    let l = self.low[v].min(self.index[w]);
                    self.low.insert(v, l);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                loop {
                    let w = self.stack.pop().unwrap();
                    self.on.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t =
        T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out
}

/// One closed path through `scc` starting at its first module, for the message.
fn a_cycle(g: &BTreeMap<String, BTreeSet<String>>, scc: &[String]) -> Vec<String> {
    let start = &scc[0];
    let mut path = vec![start.clone()];
    let mut seen = BTreeSet::new();
    fn dfs(
        g: &BTreeMap<String, BTreeSet<String>>,
        scc: &[String],
        start: &str,
        path: &mut Vec<String>,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        let v = path.last().unwrap().clone();
        for w in g[&v].iter().filter(|w| scc.contains(w)) {
            if w == start {
                path.push(w.clone());
                return true;
            }
            if seen.insert(w.clone()) {
                path.push(w.clone());
                if dfs(g, scc, start, path, seen) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    dfs(g, scc, start, &mut path, &mut seen);
    path
}

#[test]
fn the_import_graph_has_no_cycle() {
    let g = import_graph();
    for (m, uses) in &g {
        println!("{m} -> {}", uses.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    assert!(g.contains_key("cli") && g.contains_key("vm") && !g["cli"].is_empty(), "the graph was not read: {g:?}");
    let found = cycles(&g);
    for scc in &found {
        println!("cycle among {}: {}", scc.join(", "), a_cycle(&g, scc).join(" -> "));
    }
    let through_cli: Vec<_> = found.iter().filter(|scc| scc.iter().any(|m| m == "cli")).collect();
    assert!(through_cli.is_empty(), "import cycles through cli: {through_cli:?}");
    assert!(found.is_empty(), "import cycles: {found:?}");
}

#[test]
fn the_cycle_finder_finds_cycles() {
    let mut g = BTreeMap::new();
    for (a, b) in [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")] {
        g.entry(a.to_string()).or_insert_with(BTreeSet::new).insert(b.to_string());
        g.entry(b.to_string()).or_insert_with(BTreeSet::new);
    }
    let found = cycles(&g);
    assert_eq!(found, vec![vec!["a".to_string(), "b".into(), "c".into()]]);
    assert_eq!(a_cycle(&g, &found[0]), ["a", "b", "c", "a"]);
    assert_eq!(segments_after("use crate::{a::X, b};\nlet y = crate::c::f(); notcrate::d", "crate::"), ["a", "b", "c"]);
}

/// Functions longer than `max` lines in `file`: (name, lines).
fn long_functions(file: &Path, max: usize) -> Vec<(String, usize)> {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i].trim_start();
        let l = l.strip_prefix("pub(crate) ").or_else(|| l.strip_prefix("pub ")).unwrap_or(l);
        let l = l.strip_prefix("unsafe ").unwrap_or(l);
        if let Some(rest) = l.strip_prefix("fn ").filter(|_| !lines[i].trim_end().ends_with(';')) {
            let name = ident_at(rest);
            let (start, mut depth, mut seen) = (i, 0i64, false);
            while i < lines.len() {
                depth += lines[i].matches('{').count() as i64 - lines[i].matches('}').count() as i64;
                seen |= lines[i].contains('{');
                if seen && depth <= 0 {
                    break;
                }
                i += 1;
            }
            if i - start + 1 > max {
                out.push((name, i - start + 1));
            }
        }
        i += 1;
    }
    out
}

#[test]
fn fault_path_vcpu_and_vm_functions_are_at_most_80_lines() {
    let mut long = Vec::new();
    let files = [
        "fault.rs",
        "vcpu.rs",
        "dispatch.rs",
        "control.rs",
        "kvm.rs",
        "run.rs",
        "clone.rs",
        "memory/mod.rs",
        "memory/resolve.rs",
        "devices/mod.rs",
        "devices/hypercall.rs",
        "vm/mod.rs",
        "vm/builder.rs",
        "vm/running.rs",
    ];
    for f in files {
        for (name, n) in long_functions(&src().join(f), 80) {
            long.push(format!("vmm/src/{f}: {name} ({n} lines)"));
        }
    }
    assert!(long.is_empty(), "functions over 80 lines: {long:?}");
}

#[test]
fn the_length_count_finds_a_long_function() {
    let dir = std::env::temp_dir().join(format!("vkvm-shape-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("x.rs");
    let body: String = (0..80).map(|i| format!("    let _x{i} = {{ 1 }};\n")).collect();
    std::fs::write(&f, format!("fn short() {{\n}}\n\npub(crate) fn long(a: u8) {{\n{body}}}\nfn decl();\n")).unwrap();
    let found = long_functions(&f, 80);
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(found, [("long".to_string(), 82)]);
}
