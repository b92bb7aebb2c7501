//! Client id, username, password and topic templates: `{i}` is replaced by the connection's
//! index. Expanded once per connection at start-up, never per message.

/// `template` with every `{i}` replaced by `index`.
pub fn expand(template: &str, index: usize) -> String {
    if !template.contains("{i}") {
        return template.to_owned();
    }
    template.replace("{i}", &index.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_every_occurrence_and_leaves_the_rest() {
        let cases = [
            ("load-{i}", 7, "load-7"),
            ("load/{i}/x/{i}", 42, "load/42/x/42"),
            ("fixed", 3, "fixed"),
            ("", 3, ""),
            ("{i}", 0, "0"),
            ("{j}-{i", 5, "{j}-{i"),
            ("{{i}}", 9, "{9}"),
        ];
        for (template, index, expected) in cases {
            assert_eq!(expand(template, index), expected, "{template}");
        }
    }
}
