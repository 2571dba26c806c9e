//! A reader for the block-style YAML that `helm template` prints, flattening each document into
//! `(path, scalar)` pairs such as `spec.template.spec.containers[0].readinessProbe.grpc.port = 50051`
//! so that tests can assert on rendered manifests without a YAML dependency. It knows block maps,
//! block sequences (indented or at the key's column), flow sequences of scalars, `{}`/`[]`, quoted
//! scalars and comments; anything else (block scalars, anchors) is an error naming the line.

/// One YAML document as ordered `(path, scalar)` pairs; quotes are removed from scalars.
#[derive(Debug, Clone)]
pub struct FlatDoc {
    pub entries: Vec<(String, String)>,
}

impl FlatDoc {
    /// The scalar at `path`.
    pub fn get(&self, path: &str) -> Option<&str> {
        self.entries.iter().find(|(p, _)| p == path).map(|(_, v)| v.as_str())
    }

    /// The scalar at `path`, or a panic naming the path and the document.
    pub fn req(&self, path: &str) -> &str {
        self.get(path).unwrap_or_else(|| panic!("{} has no {path}", self.id()))
    }

    /// `kind/name` of the document, for messages.
    pub fn id(&self) -> String {
        format!("{}/{}", self.get("kind").unwrap_or("?"), self.get("metadata.name").unwrap_or("?"))
    }

    /// The entries under `prefix` (a map or a sequence item), with the prefix and the following
    /// `.` removed: `under("metadata.labels")` gives `[("app.kubernetes.io/name", "tessera"), ...]`.
    pub fn under(&self, prefix: &str) -> Vec<(String, String)> {
        let dotted = format!("{prefix}.");
        self.entries.iter().filter_map(|(p, v)| p.strip_prefix(&dotted).map(|rest| (rest.to_string(), v.clone()))).collect()
    }

    /// Number of items of the sequence at `path` (0 when absent).
    pub fn len(&self, path: &str) -> usize {
        (0..).take_while(|i| self.has(&format!("{path}[{i}]"))).count()
    }

    /// True when `path` is a scalar or has anything beneath it.
    pub fn has(&self, path: &str) -> bool {
        self.entries.iter().any(|(p, _)| p == path || p.strip_prefix(path).is_some_and(|rest| rest.starts_with('.') || rest.starts_with('[')))
    }
}

/// A block opened by `key:` (its value follows on deeper lines) or by `- ` (a sequence item).
enum Open {
    Key { col: usize, path: String, items: usize },
    Item { col: usize, path: String },
}

impl Open {
    fn col(&self) -> usize {
        match self {
            Open::Key { col, .. } | Open::Item { col, .. } => *col,
        }
    }
    fn path(&self) -> &str {
        match self {
            Open::Key { path, .. } | Open::Item { path, .. } => path,
        }
    }
}

/// Splits a multi-document stream at `---` lines and flattens every non-empty document.
pub fn parse_stream(text: &str) -> Result<Vec<FlatDoc>, String> {
    let mut docs = Vec::new();
    let mut current = String::new();
    for line in text.lines().chain(std::iter::once("---")) {
        if line.trim_end() == "---" {
            let doc = parse_document(&current)?;
            if !doc.entries.is_empty() {
                docs.push(doc);
            }
            current.clear();
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    Ok(docs)
}

/// Flattens one document.
pub fn parse_document(text: &str) -> Result<FlatDoc, String> {
    let mut entries = Vec::new();
    let mut stack: Vec<Open> = Vec::new();
    for (number, raw) in text.lines().enumerate() {
        let trimmed = raw.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let col = raw.len() - trimmed.len();
        let at = |e: String| format!("line {}: {e}: {raw:?}", number + 1);
        if let Some(rest) = trimmed.strip_prefix('-').filter(|r| r.is_empty() || r.starts_with(' ')) {
            // A sequence item: its parent is the nearest open key at or left of this column.
            while stack.last().is_some_and(|top| top.col() > col || matches!(top, Open::Item { col: c, .. } if *c == col)) {
                stack.pop();
            }
            let path = match stack.last_mut() {
                Some(Open::Key { path, items, .. }) => {
                    *items += 1;
                    format!("{path}[{}]", *items - 1)
                }
                _ => return Err(at("a sequence item without a parent key".into())),
            };
            let content = rest.trim_start();
            if content.is_empty() {
                stack.push(Open::Item { col, path });
            } else if split_key(content).is_some() {
                stack.push(Open::Item { col, path });
                let content_col = col + (trimmed.len() - content.len());
                key_line(content, content_col, &mut stack, &mut entries).map_err(at)?;
            } else {
                push_value(&path, content, &mut entries).map_err(at)?;
            }
        } else {
            key_line(trimmed, col, &mut stack, &mut entries).map_err(at)?;
        }
    }
    Ok(FlatDoc { entries })
}

/// A `key: value` or `key:` line at column `col`.
fn key_line(text: &str, col: usize, stack: &mut Vec<Open>, entries: &mut Vec<(String, String)>) -> Result<(), String> {
    let (key, value) = split_key(text).ok_or_else(|| "expected `key: value`".to_string())?;
    while stack.last().is_some_and(|top| top.col() >= col) {
        stack.pop();
    }
    let path = match stack.last() {
        Some(parent) => format!("{}.{key}", parent.path()),
        None => key,
    };
    if value.is_empty() {
        stack.push(Open::Key { col, path, items: 0 });
        Ok(())
    } else {
        push_value(&path, value, entries)
    }
}

/// Splits `key: value` / `key:` (the key possibly quoted); `None` for a plain scalar.
fn split_key(text: &str) -> Option<(String, &str)> {
    let (key, rest) = if let Some(quoted) = text.strip_prefix('"') {
        let end = quoted.find('"')?;
        (quoted[..end].to_string(), &quoted[end + 1..])
    } else {
        let end = text.find(": ").or_else(|| text.strip_suffix(':').map(|k| k.len()))?;
        if text.starts_with('[') || text.starts_with('{') || text.starts_with('\'') {
            return None;
        }
        (text[..end].to_string(), &text[end..])
    };
    let value = rest.strip_prefix(':')?;
    if !(value.is_empty() || value.starts_with(' ')) {
        return None;
    }
    Some((key, value.trim()))
}

/// Records a scalar (or the items of a flow sequence) at `path`.
fn push_value(path: &str, value: &str, entries: &mut Vec<(String, String)>) -> Result<(), String> {
    if value.starts_with('|') || value.starts_with('>') || value.starts_with('&') || value.starts_with('*') {
        return Err("block scalars, anchors and aliases are not supported".into());
    }
    if let Some(inner) = value.strip_prefix('[').and_then(|v| v.strip_suffix(']')) {
        if inner.trim().is_empty() {
            entries.push((path.to_string(), "[]".into()));
        }
        for (i, item) in inner.split(',').map(str::trim).filter(|s| !s.is_empty()).enumerate() {
            entries.push((format!("{path}[{i}]"), unquote(item)?));
        }
        return Ok(());
    }
    entries.push((path.to_string(), unquote(value)?));
    Ok(())
}

/// Removes the quotes of a quoted scalar (double quotes with the escapes `\"`, `\\`, `\/`, `\n`,
/// `\r`, `\t` and `\uXXXX`, as Helm's `toJson` writes them; `''` in single quotes).
fn unquote(value: &str) -> Result<String, String> {
    if let Some(inner) = value.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or("unterminated double-quoted scalar")?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            if c != '\\' {
                out.push(c);
                continue;
            }
            match chars.next() {
                Some('"') => out.push('"'),
                Some('\\') => out.push('\\'),
                Some('/') => out.push('/'),
                Some('n') => out.push('\n'),
                Some('r') => out.push('\r'),
                Some('t') => out.push('\t'),
                Some('u') => {
                    let hex: String = chars.by_ref().take(4).collect();
                    let code = u32::from_str_radix(&hex, 16).map_err(|_| format!("bad escape \\u{hex}"))?;
                    out.push(char::from_u32(code).ok_or_else(|| format!("bad escape \\u{hex}"))?);
                }
                other => return Err(format!("unsupported escape \\{}", other.map(String::from).unwrap_or_default())),
            }
        }
        Ok(out)
    } else if let Some(inner) = value.strip_prefix('\'') {
        let inner = inner.strip_suffix('\'').ok_or("unterminated single-quoted scalar")?;
        Ok(inner.replace("''", "'"))
    } else {
        Ok(value.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"---
# Source: x.yaml
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: w
  labels:
    app.kubernetes.io/name: tessera
    "helm.sh/hook": test
spec:
  policyTypes: ["Ingress", 'Egress']
  template:
    spec:
      containers:
        - name: worker
          env:
            - name: A
              value: "x: y"
            - name: B
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
          securityContext:
            capabilities:
              drop:
              - ALL
            readOnlyRootFilesystem: true
        - name: second
      volumes:
        - name: tmp
          emptyDir: {}
      args:
      - one
      - "two"
---
kind: Service
"#;

    #[test]
    fn flattens_maps_sequences_and_flow_lists() {
        let docs = parse_stream(SAMPLE).unwrap();
        assert_eq!(docs.len(), 2);
        let d = &docs[0];
        assert_eq!(d.id(), "StatefulSet/w");
        assert_eq!(d.get("metadata.labels.app.kubernetes.io/name"), Some("tessera"));
        assert_eq!(d.get("metadata.labels.helm.sh/hook"), Some("test"));
        assert_eq!(d.get("spec.policyTypes[0]"), Some("Ingress"));
        assert_eq!(d.get("spec.policyTypes[1]"), Some("Egress"));
        let c = "spec.template.spec.containers";
        assert_eq!(d.len(c), 2);
        assert_eq!(d.get(&format!("{c}[0].env[0].value")), Some("x: y"));
        assert_eq!(d.get(&format!("{c}[0].env[1].valueFrom.fieldRef.fieldPath")), Some("metadata.name"));
        assert_eq!(d.get(&format!("{c}[0].securityContext.capabilities.drop[0]")), Some("ALL"));
        assert_eq!(d.get(&format!("{c}[0].securityContext.readOnlyRootFilesystem")), Some("true"));
        assert_eq!(d.get(&format!("{c}[1].name")), Some("second"));
        assert_eq!(d.get("spec.template.spec.volumes[0].emptyDir"), Some("{}"));
        assert_eq!(d.get("spec.template.spec.args[1]"), Some("two"));
        assert_eq!(d.len("spec.template.spec.args"), 2);
        assert_eq!(d.under(&format!("{c}[0].env[0]")), vec![("name".into(), "A".into()), ("value".into(), "x: y".into())]);
        assert_eq!(docs[1].get("kind"), Some("Service"));
    }

    #[test]
    fn unsupported_yaml_is_an_error_naming_the_line() {
        let err = parse_document("a:\n  b: |\n    text\n").unwrap_err();
        assert!(err.contains("line 2"), "{err}");
        let err = parse_document("- orphan\n").unwrap_err();
        assert!(err.contains("without a parent key"), "{err}");
    }

    #[test]
    fn double_quoted_escapes_are_decoded() {
        assert_eq!(unquote(r#""a\nb\u0041\"c\\d\/""#).unwrap(), "a\nbA\"c\\d/");
        assert!(unquote(r#""\q""#).is_err());
    }
}
