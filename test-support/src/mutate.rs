//! Inputs for property-based tests of the parsers: a valid document with
//! random edits (characters deleted, replaced or inserted, lines dropped or
//! repeated), which reaches far deeper into a parser than random bytes,
//! which fail at the first character.

use proptest::prelude::*;

/// One edit, at a position given as a fraction of the text's length.
#[derive(Debug, Clone)]
pub enum Edit {
    Delete(f64, usize),
    Replace(f64, char),
    Insert(f64, String),
    DropLine(f64),
    RepeatLine(f64),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Characters YAML and JSON give meaning to, and some that they do not.
    let special = prop::sample::select(vec![
        ':',
        '-',
        '{',
        '}',
        '[',
        ']',
        ',',
        '"',
        '\'',
        '#',
        '&',
        '*',
        '!',
        '|',
        '>',
        ' ',
        '\n',
        '\t',
        '0',
        '9',
        'x',
        '/',
        '.',
        '%',
        '@',
        '\u{0}',
        'é',
        '\u{1F600}',
    ]);
    prop_oneof![
        (0.0..1.0f64, 1..8usize).prop_map(|(at, n)| Edit::Delete(at, n)),
        (0.0..1.0f64, special.clone()).prop_map(|(at, c)| Edit::Replace(at, c)),
        (0.0..1.0f64, prop::collection::vec(special, 1..6))
            .prop_map(|(at, cs)| Edit::Insert(at, cs.into_iter().collect())),
        (0.0..1.0f64).prop_map(Edit::DropLine),
        (0.0..1.0f64).prop_map(Edit::RepeatLine),
    ]
}

/// The character boundary nearest below `at` of the way through `s`.
fn boundary(s: &str, at: f64) -> usize {
    let mut i = ((s.len() as f64) * at) as usize;
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i.min(s.len())
}

fn apply(mut s: String, e: &Edit) -> String {
    match e {
        Edit::Delete(at, n) => {
            let i = boundary(&s, *at);
            let mut j = (i + n).min(s.len());
            while !s.is_char_boundary(j) {
                j += 1;
            }
            s.replace_range(i..j, "");
        }
        Edit::Replace(at, c) => {
            let i = boundary(&s, *at);
            if let Some(old) = s[i..].chars().next() {
                s.replace_range(i..i + old.len_utf8(), &c.to_string());
            }
        }
        Edit::Insert(at, t) => {
            let i = boundary(&s, *at);
            s.insert_str(i, t);
        }
        Edit::DropLine(at) | Edit::RepeatLine(at) => {
            let mut lines: Vec<&str> = s.lines().collect();
            if !lines.is_empty() {
                let i = ((lines.len() as f64) * at) as usize % lines.len();
                match e {
                    Edit::DropLine(_) => {
                        lines.remove(i);
                    }
                    _ => lines.insert(i, lines[i]),
                }
            }
            s = lines.join("\n");
        }
    }
    s
}

/// `base` with 1 to 4 random edits.
pub fn mutations(base: &str) -> impl Strategy<Value = String> {
    let base = base.to_owned();
    prop::collection::vec(edit(), 1..5)
        .prop_map(move |edits| edits.iter().fold(base.clone(), apply))
}
