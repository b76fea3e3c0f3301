//! Builder (placeholder until the converter lands in the next commit).
