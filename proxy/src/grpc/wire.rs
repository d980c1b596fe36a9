//! The protobuf wire format, walked without decoding: for the few facts the proxy reads from
//! messages it forwards unchanged, and for the few fields it rewrites in place. One walker for
//! both, so that a malformed message is judged the same way everywhere.

use std::ops::Range;

/// One protobuf field's value as it is on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireValue<'a> {
    /// Integers, booleans and enums.
    Varint(u64),
    /// Strings, bytes and embedded messages.
    Bytes(&'a [u8]),
    /// Fixed-width numbers, which etcd's messages do not use.
    Fixed,
}

/// One top-level field of an encoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field<'a> {
    /// The field number.
    pub number: u64,
    /// Its value.
    pub value: WireValue<'a>,
    /// Where the field (tag included) is in the message.
    pub span: Range<usize>,
}

/// The top-level fields of an encoded message, in order, without decoding them; a malformed
/// field ends the walk with its error.
pub struct Fields<'a> {
    message: &'a [u8],
    at: usize,
}

/// Walks the top-level fields of `message`.
pub fn fields(message: &[u8]) -> Fields<'_> {
    Fields { message, at: 0 }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        use prost::encoding::decode_varint;
        if self.at >= self.message.len() {
            return None;
        }
        let start = self.at;
        let mut rest = &self.message[start..];
        let field = (|| {
            let key = decode_varint(&mut rest).map_err(|e| e.to_string())?;
            let value = match key & 7 {
                0 => WireValue::Varint(decode_varint(&mut rest).map_err(|e| e.to_string())?),
                2 => {
                    let length = usize::try_from(decode_varint(&mut rest).map_err(|e| e.to_string())?)
                        .map_err(|_| format!("field at byte {start} is longer than memory"))?;
                    let content =
                        rest.get(..length).ok_or_else(|| format!("field at byte {start} runs past the message"))?;
                    rest = &rest[length..];
                    WireValue::Bytes(content)
                }
                wire_type @ (1 | 5) => {
                    let width = if wire_type == 1 { 8 } else { 4 };
                    rest = rest.get(width..).ok_or_else(|| format!("field at byte {start} runs past the message"))?;
                    WireValue::Fixed
                }
                wire_type => return Err(format!("unexpected wire type {wire_type} at byte {start}")),
            };
            Ok(Field { number: key >> 3, value, span: start..self.message.len() - rest.len() })
        })();
        match &field {
            Ok(field) => self.at = field.span.end,
            // A malformed field ends the walk.
            Err(_) => self.at = self.message.len(),
        }
        Some(field)
    }
}

/// Calls `visit` with each top-level field's number, value and span (tag included), in order.
pub fn for_each_field<'a>(
    message: &'a [u8],
    mut visit: impl FnMut(u64, WireValue<'a>, Range<usize>),
) -> Result<(), String> {
    for field in fields(message) {
        let field = field?;
        visit(field.number, field.value, field.span);
    }
    Ok(())
}

/// Appends `value` as a protobuf varint.
pub fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_in_order_with_their_spans() {
        // field 1 varint 150, field 2 bytes "hi", field 3 fixed32.
        let message = [0x08, 0x96, 0x01, 0x12, 0x02, b'h', b'i', 0x1d, 1, 2, 3, 4];
        let all: Vec<Field> = fields(&message).collect::<Result<_, _>>().unwrap();
        assert_eq!(
            all,
            vec![
                Field { number: 1, value: WireValue::Varint(150), span: 0..3 },
                Field { number: 2, value: WireValue::Bytes(b"hi"), span: 3..7 },
                Field { number: 3, value: WireValue::Fixed, span: 7..12 },
            ]
        );
        let mut varint = Vec::new();
        put_varint(&mut varint, 150);
        assert_eq!(varint, [0x96, 0x01]);
    }

    #[test]
    fn a_malformed_field_ends_the_walk_with_its_error() {
        let mut walk = fields(&[0x08, 0x01, 0x12, 0x05, b'a']);
        assert!(walk.next().unwrap().is_ok());
        assert_eq!(walk.next().unwrap().unwrap_err(), "field at byte 2 runs past the message");
        assert!(walk.next().is_none());
        assert_eq!(for_each_field(&[0x0b], |_, _, _| {}).unwrap_err(), "unexpected wire type 3 at byte 0");
    }
}
