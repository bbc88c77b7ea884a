//! No input may make hlac panic: parse and check are fed mutated specs and random text
//! (10,000 cases by default; `PROPTEST_CASES` overrides) and must return, with or without errors.

use proptest::prelude::*;

fn seeds() -> Vec<String> {
    let mut files = hlac_tests::hla_files("specs");
    files.extend(hlac_tests::hla_files("specs/errors"));
    // A few representative specs keep each case fast; the mutations do the exploring.
    files.retain(|p| {
        let s = hlac_tests::stem(p);
        s.contains("340m") && s.contains("r3") || s.starts_with('E') || s.starts_with('W') || s == "hgrn2-r3"
    });
    let mut seeds: Vec<String> = files.iter().filter_map(|p| std::fs::read_to_string(p).ok()).collect();
    seeds.push(hlac::load::PRELUDE.to_string());
    seeds
}

/// Tokens that appear in specs, for building plausible nonsense.
const TOKENS: &[&str] = &[
    "model",
    "recurrence",
    "attention",
    "target",
    "import",
    "mixer",
    "mlp",
    "fla",
    "pattern",
    "param",
    "let",
    "heads",
    "state",
    "token",
    "head",
    "def",
    "update",
    "output",
    "linear",
    "norm",
    "conv",
    "weight",
    "shared",
    "if",
    "else",
    "require",
    "bias",
    "from",
    "{",
    "}",
    "[",
    "]",
    "(",
    ")",
    "=",
    ",",
    ";",
    ":",
    "x",
    "×",
    "*",
    "/",
    "%",
    "+",
    "-",
    "^T",
    "!",
    "&&",
    "||",
    "==",
    "<",
    ">",
    "0",
    "1",
    "3",
    "-1",
    "1e-6",
    "1e400",
    "99999999999999999999",
    "4096",
    "2.5",
    "\"s\"",
    "none",
    "true",
    "S",
    "K",
    "V",
    "I",
    "q",
    "k",
    "v",
    "GDN",
    "Attn",
    "GLA",
    "HGRN",
    "diag",
    "exp",
    "sigmoid",
    "l2norm",
    "hidden_size",
    "num_heads",
    "int",
    "float",
    "bool",
    "str",
    "?",
    "\n",
    " ",
    "//c\n",
    "/*c*/",
];

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, usize),
    Duplicate(usize, usize),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), 1usize..12).prop_map(|(a, n)| Edit::Delete(a, n)),
        (any::<usize>(), any::<usize>()).prop_map(|(a, t)| Edit::Insert(a, t)),
        (any::<usize>(), 1usize..40).prop_map(|(a, n)| Edit::Duplicate(a, n)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn boundary(s: &str, i: usize) -> usize {
    let mut i = i % (s.len() + 1);
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn apply(mut s: String, edits: &[Edit]) -> String {
    for e in edits {
        match *e {
            Edit::Delete(a, n) => {
                let a = boundary(&s, a);
                let b = boundary(&s, a + n);
                s.replace_range(a..b.max(a), "");
            }
            Edit::Insert(a, t) => {
                let a = boundary(&s, a);
                s.insert_str(a, TOKENS[t % TOKENS.len()]);
            }
            Edit::Duplicate(a, n) => {
                let a = boundary(&s, a);
                let b = boundary(&s, a + n).max(a);
                let piece = s[a..b].to_string();
                s.insert_str(b, &piece);
            }
            Edit::Truncate(a) => {
                let a = boundary(&s, a);
                s.truncate(a);
            }
        }
    }
    s
}

fn check(text: &str) {
    let c = hlac::compile_str("<fuzz>", text, &hlac_tests::root().join("specs/errors"));
    // Rendering must not panic either, and a failed compilation never yields a model.
    let _ = c.render(false);
    assert!(!(c.failed() && c.model.is_some()));
    if let Ok(file) = hlac_grammar::parse(hlac_grammar::FileId(0), text) {
        let _ = hlac_grammar::fmt::format_file(&file, text);
    }
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(5_000);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn mutated_specs_never_panic(seed in any::<usize>(), edits in proptest::collection::vec(edit(), 1..6)) {
        let seeds = seeds_cached();
        let text = apply(seeds[seed % seeds.len()].clone(), &edits);
        check(&text);
    }

    #[test]
    fn token_soup_never_panics(tokens in proptest::collection::vec(any::<usize>(), 0..80)) {
        let text: String = tokens.iter().map(|t| TOKENS[t % TOKENS.len()]).collect::<Vec<_>>().join(" ");
        check(&text);
    }

    #[test]
    fn arbitrary_text_never_panics(text in ".{0,200}") {
        check(&text);
    }
}

fn seeds_cached() -> &'static [String] {
    static SEEDS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(seeds)
}

#[test]
fn deeply_nested_input_is_an_error_not_a_crash() {
    let text = format!("model m {{ hidden_size = 1 pattern = {}GDN{} }}", "[".repeat(5000), "]".repeat(5000));
    let c = hlac::compile_str("<deep>", &text, &hlac_tests::root());
    assert!(c.failed());
    let text = format!("model m {{ hidden_size = {}1{} pattern = GDN }}", "(".repeat(150), ")".repeat(150));
    check(&text);
}
