//! The documentation says what the code does: every filter has its page under docs/, every field
//! a page documents exists in the filter's JSON Schema (generated from the configuration types,
//! which `tests/schemas.rs` keeps current) with the default and the requiredness the page gives,
//! every field of the schema is documented, and every relative link resolves.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;

const FILTERS: [&str; 5] = ["serverless", "egress", "mesh-identity", "cloud-connector", "tunnel-auth"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// One row of a page's field table.
struct Row {
    paths: Vec<String>,
    default: String,
}

/// Lines outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|line| {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// The `` `code` `` spans of a table cell.
fn code_spans(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(String::from).collect()
}

fn cells(line: &str) -> Vec<&str> {
    line.trim().trim_matches('|').split('|').map(str::trim).collect()
}

/// The rows of every `| field | default | meaning |` table of a page.
fn field_rows(page: &str) -> Vec<Row> {
    let lines = prose(page);
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in lines {
        if cells(line) == ["field", "default", "meaning"] {
            in_table = true;
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        let c = cells(line);
        if in_table && !c[0].starts_with("---") {
            rows.push(Row { paths: code_spans(c[0]), default: c[1].to_string() });
        }
    }
    rows
}

/// The object schemas a schema stands for: `$ref`s followed, `anyOf`/`oneOf` variants (but
/// `null`) taken apart.
fn variants<'a>(root: &'a Value, node: &'a Value) -> Vec<&'a Value> {
    if let Some(r) = node.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/$defs/");
        return variants(root, &root["$defs"][name]);
    }
    for key in ["anyOf", "oneOf", "allOf"] {
        if let Some(list) = node.get(key).and_then(Value::as_array) {
            return list
                .iter()
                .filter(|v| v.get("type") != Some(&Value::from("null")))
                .flat_map(|v| variants(root, v))
                .collect();
        }
    }
    vec![node]
}

/// A field's schemas (one per variant that has it) and whether each variant requires it.
struct Found<'a> {
    schemas: Vec<&'a Value>,
    required: Vec<bool>,
}

fn lookup<'a>(root: &'a Value, path: &str) -> Result<Found<'a>, String> {
    let mut nodes = vec![root];
    let mut found = Found { schemas: Vec::new(), required: Vec::new() };
    for segment in path.split('.') {
        let (name, items) = match segment.strip_suffix("[]") {
            Some(name) => (name, true),
            None => (segment, false),
        };
        found = Found { schemas: Vec::new(), required: Vec::new() };
        for node in nodes.iter().flat_map(|n| variants(root, n)) {
            if name == "*" {
                if node.get("properties").is_none() {
                    return Err(format!("`{path}`: `*` stands for the fields of something that has none"));
                }
                return Ok(Found { schemas: vec![node], required: vec![false] });
            }
            if let Some(property) = node.get("properties").and_then(|p| p.get(name)) {
                let required = node["required"].as_array().is_some_and(|r| r.contains(&Value::from(name)));
                found.schemas.push(property);
                found.required.push(required);
            }
        }
        if found.schemas.is_empty() {
            return Err(format!("`{path}`: the schema has no field `{name}` there"));
        }
        nodes = if items {
            let mut inner = Vec::new();
            for s in &found.schemas {
                for v in variants(root, s) {
                    inner.push(v.get("items").ok_or_else(|| format!("`{path}`: `{name}` is not an array"))?);
                }
            }
            inner
        } else {
            found.schemas.clone()
        };
    }
    Ok(found)
}

/// Every field path of a schema (`a`, `a.b`, `list[].c`), maps and their values not entered.
fn all_paths(root: &Value, node: &Value, prefix: &str, out: &mut BTreeSet<String>) {
    for v in variants(root, node) {
        let Some(properties) = v.get("properties").and_then(Value::as_object) else { continue };
        for (name, property) in properties {
            let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
            out.insert(path.clone());
            all_paths(root, property, &path, out);
            for p in variants(root, property) {
                if let Some(items) = p.get("items") {
                    all_paths(root, items, &format!("{path}[]"), out);
                }
            }
        }
    }
}

/// A default cell that is a literal (a number, `true`, a code span holding one value) as JSON;
/// prose (`the issuer's host`, `none`) is not checked.
fn literal(cell: &str) -> Option<Value> {
    let cell = cell.trim();
    if let Ok(n) = cell.parse::<u64>() {
        return Some(n.into());
    }
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    if inner.contains('`') {
        return None;
    }
    Some(serde_json::from_str(inner).unwrap_or_else(|_| Value::from(inner)))
}

fn check_page(filter: &str) -> Vec<String> {
    let page_path = root().join("docs").join(format!("{filter}.md"));
    let page = fs::read_to_string(&page_path).unwrap_or_else(|e| panic!("{}: {e}", page_path.display()));
    let schema: Value =
        serde_json::from_str(&fs::read_to_string(root().join(format!("schemas/{filter}.schema.json"))).unwrap())
            .unwrap();
    let rows = field_rows(&page);
    let mut wrong = Vec::new();
    if rows.is_empty() {
        wrong.push(format!("docs/{filter}.md has no `| field | default | meaning |` table"));
    }
    let mut documented = BTreeSet::new();
    for row in &rows {
        if row.paths.is_empty() {
            wrong.push(format!("docs/{filter}.md: a row names no field"));
        }
        // "a / b" with a default per field, or one default for all.
        let defaults: Vec<&str> = match row.default.split(" / ").collect::<Vec<_>>() {
            d if d.len() == row.paths.len() => d,
            _ => match row.default.split(", ").collect::<Vec<_>>() {
                d if d.len() == row.paths.len() && row.paths.len() > 1 => d,
                _ => vec![row.default.as_str(); row.paths.len()],
            },
        };
        for (path, default) in row.paths.iter().zip(defaults) {
            documented.insert(path.clone());
            let found = match lookup(&schema, path) {
                Ok(found) => found,
                Err(e) => {
                    wrong.push(format!("docs/{filter}.md: {e}"));
                    continue;
                }
            };
            if path.ends_with(".*") {
                continue;
            }
            let required = found.required.iter().all(|r| *r);
            if (default == "required") != required {
                wrong.push(format!(
                    "docs/{filter}.md: `{path}` is {} in the schema, the page's default says {default:?}",
                    if required { "required" } else { "optional" }
                ));
            }
            // schemars writes a default it can serialize (not, say, a list of structs).
            let schema_default = found.schemas.iter().find_map(|s| s.get("default"));
            if let (Some(value), Some(schema_default)) = (literal(default), schema_default) {
                if *schema_default != value {
                    wrong.push(format!(
                        "docs/{filter}.md: `{path}` defaults to {schema_default}, the page says {value}"
                    ));
                }
            }
        }
    }
    let mut fields = BTreeSet::new();
    all_paths(&schema, &schema, "", &mut fields);
    for field in fields {
        // Documented itself, under a `parent.*` row, or through rows of its own fields.
        let covered = documented.contains(&field)
            || documented.iter().any(|d| d.strip_suffix('*').is_some_and(|parent| field.starts_with(parent)))
            || documented.iter().any(|d| d.starts_with(&format!("{field}.")) || d.starts_with(&format!("{field}[].")));
        if !covered {
            wrong.push(format!("docs/{filter}.md does not document `{field}`"));
        }
    }
    wrong
}

#[test]
fn every_filter_page_documents_exactly_its_schema() {
    let wrong: Vec<String> = FILTERS.iter().flat_map(|f| check_page(f)).collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// The GitHub anchor of a heading.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

fn markdown_files() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md")];
    files.extend(
        fs::read_dir(root().join("docs"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "md")),
    );
    files
}

#[test]
fn the_readme_links_every_page_and_every_link_resolves() {
    let readme = fs::read_to_string(root().join("README.md")).unwrap();
    let mut wrong = Vec::new();
    for page in fs::read_dir(root().join("docs")).unwrap() {
        let name = page.unwrap().file_name().into_string().unwrap();
        if !readme.contains(&format!("(docs/{name})")) {
            wrong.push(format!("README.md does not link docs/{name}"));
        }
    }
    for filter in FILTERS {
        if !root().join(format!("docs/{filter}.md")).exists() {
            wrong.push(format!("no docs/{filter}.md"));
        }
    }
    for file in markdown_files() {
        let text = fs::read_to_string(&file).unwrap();
        let dir = file.parent().unwrap();
        for line in prose(&text) {
            for (i, _) in line.match_indices("](") {
                let target: String = line[i + 2..].chars().take_while(|c| *c != ')').collect();
                if target.starts_with("http") {
                    continue;
                }
                let (path, fragment) = target.split_once('#').unwrap_or((&target, ""));
                let linked = if path.is_empty() { file.clone() } else { dir.join(path) };
                if !linked.exists() {
                    wrong.push(format!("{}: link to {target}: no such file", file.display()));
                    continue;
                }
                if !fragment.is_empty() {
                    let headings = fs::read_to_string(&linked).unwrap();
                    let found = prose(&headings)
                        .iter()
                        .filter_map(|l| l.strip_prefix('#').map(|h| h.trim_start_matches('#')))
                        .any(|h| anchor(h) == fragment);
                    if !found {
                        wrong.push(format!("{}: link to {target}: no such heading", file.display()));
                    }
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_checks_find_what_they_look_for() {
    // A page row for a field the schema lacks, a wrong default and a missing field are caught.
    let schema: Value = serde_json::json!({
        "properties": { "a": { "default": 1 }, "b": { "type": "string" } },
        "required": ["b"]
    });
    assert!(lookup(&schema, "c").is_err());
    assert_eq!(lookup(&schema, "b").unwrap().required, [true]);
    assert_eq!(literal("`[\"x\"]`"), Some(serde_json::json!(["x"])));
    assert_eq!(literal("the issuer's host"), None);
    let rows = field_rows("| field | default | meaning |\n|---|---|---|\n| `a` / `b` | 1 / required | x |\n\ntext\n");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].paths, ["a", "b"]);
    let mut paths = BTreeSet::new();
    all_paths(&schema, &schema, "", &mut paths);
    assert_eq!(paths.into_iter().collect::<Vec<_>>(), ["a", "b"]);
    assert_eq!(anchor("What limits the filters"), "what-limits-the-filters");
    let _ = Path::new("");
}
