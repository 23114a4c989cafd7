//! The repository: Ferry's data format and the data mover that fills and
//! reads it (chunk → hash → compress → encrypt → pack → upload, and back).
