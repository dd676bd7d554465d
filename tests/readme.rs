//! What users copy from README.md is what the tests run.

/// The code blocks of a Markdown text with their info string (`rust,ignore`, `sh`, ...).
fn code_blocks(md: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in md.split_inclusive('\n') {
        match (&mut current, line.strip_prefix("```")) {
            (None, Some(info)) => current = Some((info.trim().to_string(), String::new())),
            (Some(_), Some(_)) => out.push(current.take().unwrap()),
            (Some((_, body)), None) => body.push_str(line),
            (None, None) => {}
        }
    }
    out
}

#[test]
fn the_readme_http_service_is_examples_hello_axum_verbatim() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let example = std::fs::read_to_string(format!("{root}/examples/hello_axum.rs")).unwrap();
    let rust: Vec<String> = code_blocks(&readme)
        .into_iter()
        .filter(|(info, _)| info.starts_with("rust"))
        .map(|(_, body)| body)
        .collect();
    assert!(
        rust.contains(&example),
        "README.md has no Rust block identical to examples/hello_axum.rs (which tests/http.rs drives through \
         upgrades): copy the file into the README's Tokio section"
    );
}

#[test]
fn code_blocks_are_found() {
    let md = "text\n```rust\nfn a() {}\n```\n```sh\nls\n```\n";
    assert_eq!(
        code_blocks(md),
        vec![
            ("rust".to_string(), "fn a() {}\n".to_string()),
            ("sh".to_string(), "ls\n".to_string())
        ]
    );
}
