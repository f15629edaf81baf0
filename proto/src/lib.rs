pub const PLACEHOLDER: u8 = 0;
