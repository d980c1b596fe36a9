use std::path::Path;

/// How many log lines error messages quote.
pub(crate) const TAIL_LINES: usize = 40;

/// The last `count` lines of `text`.
pub(crate) fn last_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

/// The whole file as text; unreadable files yield a description of the failure instead,
/// because callers only use this to explain another error.
pub(crate) fn read_lossy(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => format!("<cannot read {}: {error}>", path.display()),
    }
}

/// The last [`TAIL_LINES`] lines of the file at `path`, headed by its path.
pub(crate) fn file_tail(path: &Path) -> String {
    format!("--- last {TAIL_LINES} lines of {} ---\n{}", path.display(), last_lines(&read_lossy(path), TAIL_LINES))
}
