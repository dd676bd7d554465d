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

/// The README's dependency block, as a newcomer uses it today (a checkout beside the project), builds the
/// README's service: a fresh crate with that `[dependencies]` block (the path pointed at this checkout) and
/// the service as its `main.rs`.
#[test]
fn the_readme_dependency_block_builds_the_readme_service() {
    let root = env!("CARGO_MANIFEST_DIR");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    let deps = code_blocks(&readme)
        .into_iter()
        .find(|(info, body)| info == "toml" && body.contains("exuvia = { path = \"../exuvia\""))
        .map(|(_, body)| body)
        .expect("README.md has no [dependencies] block with exuvia from a checkout");
    let dir = tempfile::tempdir().unwrap();
    let deps = deps.replace("\"../exuvia\"", &format!("{:?}", root));
    std::fs::write(
        dir.path().join("Cargo.toml"),
        format!("[package]\nname = \"readme-service\"\nversion = \"0.1.0\"\nedition = \"2021\"\n\n{deps}"),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("src")).unwrap();
    std::fs::copy(
        format!("{root}/examples/hello_axum.rs"),
        dir.path().join("src/main.rs"),
    )
    .unwrap();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Its own target directory inside the temporary one: nothing of this checkout's build is touched.
    let out = std::process::Command::new(cargo)
        .args(["build", "--quiet"])
        .current_dir(dir.path())
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the README's dependency block does not build the README's service:\n{}",
        String::from_utf8_lossy(&out.stderr)
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
