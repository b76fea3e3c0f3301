//! Registry client (resolve, auth, ranges, retries) and the lazy blob reader.
