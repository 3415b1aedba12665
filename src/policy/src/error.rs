use std::path::PathBuf;

/// Why a policy could not be loaded.
///
/// Every variant carries the file so that the one line the daemon logs on a
/// failed reload is enough to go and fix it; the ones about content also
/// carry the line, in the `path:line` form editors and terminals can jump to.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum PolicyError {
    /// The file could not be read (for a standard location: it exists but is
    /// unreadable; a missing standard file is not an error).
    #[error("{}: cannot read: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML reader refused it: not TOML, an unknown key, a value of the
    /// wrong type or a malformed size, duration or name.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    /// Well-formed, but meaningless here: an unknown user or group, two rules
    /// with one name, a rule that matches nothing in particular.
    #[error("{}:{line}: {message}", path.display())]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// Someone other than root (or the daemon's own user) could change the
    /// file, so obeying it would hand them the daemon's privileges.
    #[error("{}: refusing to use: {message}", path.display())]
    Insecure { path: PathBuf, message: String },
}

impl PolicyError {
    /// The file the problem is in.
    pub fn path(&self) -> &std::path::Path {
        match self {
            PolicyError::Io { path, .. }
            | PolicyError::Syntax { path, .. }
            | PolicyError::Invalid { path, .. }
            | PolicyError::Insecure { path, .. } => path,
        }
    }

    /// The 1-based line, where the problem has one.
    pub fn line(&self) -> Option<usize> {
        match self {
            PolicyError::Syntax { line, .. } | PolicyError::Invalid { line, .. } => Some(*line),
            PolicyError::Io { .. } | PolicyError::Insecure { .. } => None,
        }
    }
}
