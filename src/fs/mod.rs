//! One mounted eStargz layer served through FUSE: inode table, reads, prefetch, background fetch.
