//! The pickles of PyTorch checkpoints, read as data: a pickle is a program for Python's stack
//! machine (`Lib/pickletools.py` documents every opcode), and this reader runs the few opcodes a
//! `torch.save` of a state dict uses (protocol 2) to rebuild the saved object as a tree of
//! [`Value`]s. Nothing in a pickle is ever executed: a `GLOBAL` only records the names it gives, a
//! `REDUCE` records the call Python would make (`_rebuild_tensor_v2(...)`, or `os.system(...)` in a
//! malicious file) without making it, a `BUILD` leaves its object as it is, and opcodes this reader
//! does not know (`INST`, `OBJ`, `STACK_GLOBAL`, ...) make it refuse the file.
//!
//! Every value lives in one table and containers refer to their items by index, so a memo
//! reference (`BINGET`) shares a value instead of copying it: each opcode makes one value at most,
//! whatever the nesting or sharing, dropping them never recurses, and a pickle runs at most
//! [`MAX_OPCODES`] opcodes.

use std::collections::HashMap;

/// Most opcodes a pickle may run (a few hundred MB of values at most): a state dict's pickle
/// takes about 40 per tensor.
const MAX_OPCODES: usize = 1 << 22;

/// Index of a value in its [`Pickle`].
pub type Id = usize;

/// One value of an unpickled object.
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// A float; its value is never needed.
    Float,
    Str(String),
    /// A class or function named by `GLOBAL`.
    Global {
        module: String,
        name: String,
    },
    Tuple(Vec<Id>),
    List(Vec<Id>),
    Dict(Vec<(Id, Id)>),
    /// `callable(*args)` as `REDUCE` or `NEWOBJ` describe it, never called.
    Call {
        callable: Id,
        args: Id,
    },
    /// A reference to data outside the pickle (`BINPERSID`): a tensor's storage.
    PersistentId(Id),
}

/// An unpickled object: its values and the top one.
pub struct Pickle {
    values: Vec<Value>,
    root: Id,
}

/// The unpickler's stack: the values above the innermost MARK are the only ones an opcode may
/// take, as in Python (whose MARK starts a new stack).
#[derive(Default)]
struct Stack {
    items: Vec<Id>,
    /// Lengths of `items` at each open MARK.
    marks: Vec<usize>,
}

impl Stack {
    /// The last `n` items, first to last.
    fn pop_n(&mut self, n: usize) -> Result<Vec<Id>, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        let start = self.items.len().checked_sub(n).filter(|&start| start >= floor).ok_or("the stack is empty")?;
        Ok(self.items.split_off(start))
    }

    fn pop(&mut self) -> Result<Id, String> {
        Ok(self.pop_n(1)?[0])
    }

    fn last(&self) -> Result<Id, String> {
        let floor = self.marks.last().copied().unwrap_or(0);
        self.items.last().copied().filter(|_| self.items.len() > floor).ok_or_else(|| "the stack is empty".into())
    }

    /// The items above the innermost MARK, which is closed.
    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let mark = self.marks.pop().ok_or("no MARK to pop to")?;
        Ok(self.items.split_off(mark))
    }
}

/// Reads a pickle from the front of a byte slice.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or("the pickle ends early")?;
        let taken = &self.bytes[self.at..end];
        self.at = end;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes taken"))
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn string(&mut self, len: usize) -> Result<String, String> {
        String::from_utf8(self.take(len)?.to_vec()).map_err(|_| "a string is not valid UTF-8".to_string())
    }

    /// A line ended by `\n` (the names of `GLOBAL`).
    fn line(&mut self) -> Result<String, String> {
        let len = self.bytes[self.at..].iter().position(|&b| b == b'\n').ok_or("the pickle ends early")?;
        let line = self.string(len)?;
        self.at += 1;
        Ok(line)
    }
}

impl Pickle {
    /// Parses the pickle at the start of `bytes`; returns it and the number of bytes it took.
    pub fn parse(bytes: &[u8]) -> Result<(Self, usize), String> {
        let mut reader = Reader { bytes, at: 0 };
        let mut pickle = Self { values: Vec::new(), root: 0 };
        pickle.run(&mut reader).map_err(|e| format!("{e}, at byte {} of the pickle", reader.at))?;
        Ok((pickle, reader.at))
    }

    /// The saved object.
    pub fn root(&self) -> Id {
        self.root
    }

    pub fn get(&self, id: Id) -> &Value {
        &self.values[id]
    }

    /// Every value, in the order they were made.
    pub fn values(&self) -> &[Value] {
        &self.values
    }

    fn add(&mut self, value: Value) -> Id {
        self.values.push(value);
        self.values.len() - 1
    }

    /// Runs the opcodes up to `STOP`.
    fn run(&mut self, r: &mut Reader) -> Result<(), String> {
        let mut stack = Stack::default();
        let mut memo: HashMap<u32, Id> = HashMap::new();
        for _ in 0..MAX_OPCODES {
            let opcode = r.byte()?;
            let value = match opcode {
                0x80 => {
                    // PROTO: the protocol number; the opcodes say the rest.
                    r.byte()?;
                    continue;
                }
                b'.' => {
                    // STOP
                    self.root = stack.pop()?;
                    return Ok(());
                }
                b'(' => {
                    // MARK
                    stack.marks.push(stack.items.len());
                    continue;
                }
                b'N' => Value::None,
                0x88 => Value::Bool(true),
                0x89 => Value::Bool(false),
                b'K' => Value::Int(i64::from(r.byte()?)),
                b'M' => Value::Int(i64::from(u16::from_le_bytes(r.array()?))),
                b'J' => Value::Int(i64::from(i32::from_le_bytes(r.array()?))),
                0x8a => {
                    // LONG1: a little-endian two's-complement integer of n bytes.
                    let n = usize::from(r.byte()?);
                    if n > 8 {
                        return Err(format!("an integer of {n} bytes is too large"));
                    }
                    let bytes = r.take(n)?;
                    let fill = if bytes.last().is_some_and(|&b| b >= 0x80) { 0xFF } else { 0 };
                    let mut full = [fill; 8];
                    full[..n].copy_from_slice(bytes);
                    Value::Int(i64::from_le_bytes(full))
                }
                b'G' => {
                    r.array::<8>()?;
                    Value::Float
                }
                b'X' => {
                    // BINUNICODE
                    let len = r.u32()?;
                    Value::Str(r.string(usize::try_from(len).map_err(|_| "a string is too long")?)?)
                }
                b'c' => Value::Global { module: r.line()?, name: r.line()? },
                b')' => Value::Tuple(Vec::new()),
                b't' => Value::Tuple(stack.pop_mark()?),
                0x85..=0x87 => Value::Tuple(stack.pop_n(usize::from(opcode - 0x84))?),
                b']' => Value::List(Vec::new()),
                b'}' => Value::Dict(Vec::new()),
                b'd' => Value::Dict(pairs(stack.pop_mark()?)?),
                b'a' | b'e' => {
                    // APPEND, APPENDS
                    let items = if opcode == b'a' { stack.pop_n(1)? } else { stack.pop_mark()? };
                    match &mut self.values[stack.last()?] {
                        Value::List(list) => list.extend(items),
                        _ => return Err("items appended to something that is not a list".into()),
                    }
                    continue;
                }
                b's' | b'u' => {
                    // SETITEM, SETITEMS
                    let items = pairs(if opcode == b's' { stack.pop_n(2)? } else { stack.pop_mark()? })?;
                    match &mut self.values[stack.last()?] {
                        Value::Dict(dict) => dict.extend(items),
                        _ => return Err("items set on something that is not a dict".into()),
                    }
                    continue;
                }
                b'Q' => Value::PersistentId(stack.pop()?),
                b'R' | 0x81 => {
                    // REDUCE, NEWOBJ
                    let args = stack.pop()?;
                    let callable = stack.pop()?;
                    let no_args = matches!(self.get(args), Value::Tuple(items) if items.is_empty());
                    if no_args && self.is_global(callable, "collections", "OrderedDict") {
                        // `OrderedDict()`, which SETITEMS then fill: state dicts are these.
                        Value::Dict(Vec::new())
                    } else {
                        Value::Call { callable, args }
                    }
                }
                b'b' => {
                    // BUILD: would set the object's state (`__setstate__`); the object stays as is.
                    stack.pop()?;
                    stack.last()?;
                    continue;
                }
                b'q' | b'r' => {
                    // BINPUT, LONG_BINPUT
                    let key = if opcode == b'q' { u32::from(r.byte()?) } else { r.u32()? };
                    memo.insert(key, stack.last()?);
                    continue;
                }
                b'h' | b'j' => {
                    // BINGET, LONG_BINGET
                    let key = if opcode == b'h' { u32::from(r.byte()?) } else { r.u32()? };
                    stack.items.push(*memo.get(&key).ok_or_else(|| format!("memo entry {key} is missing"))?);
                    continue;
                }
                other => return Err(format!("pickle opcode 0x{other:02x} is not supported")),
            };
            let id = self.add(value);
            stack.items.push(id);
        }
        Err(format!("it runs more than {MAX_OPCODES} opcodes, far more than a state dict takes"))
    }

    /// The value of a dict entry whose key is the string `key`.
    pub fn lookup(&self, dict: &[(Id, Id)], key: &str) -> Option<Id> {
        dict.iter().find(|&&(k, _)| matches!(self.get(k), Value::Str(s) if s == key)).map(|&(_, v)| v)
    }

    /// Whether `id` is the global `module.name`.
    pub fn is_global(&self, id: Id, module: &str, name: &str) -> bool {
        matches!(self.get(id), Value::Global { module: m, name: n } if m == module && n == name)
    }

    pub fn int(&self, id: Id) -> Option<i64> {
        match self.get(id) {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn tuple(&self, id: Id) -> Option<&[Id]> {
        match self.get(id) {
            Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// What kind of value `id` is, for messages.
    pub fn kind(&self, id: Id) -> &'static str {
        match self.get(id) {
            Value::Dict(_) => "a dict",
            Value::List(_) => "a list",
            Value::Tuple(_) => "a tuple",
            Value::Call { .. } => "a Python object",
            Value::Global { .. } => "a Python class",
            Value::PersistentId(_) => "a storage",
            Value::None | Value::Bool(_) | Value::Int(_) | Value::Float | Value::Str(_) => "a plain value",
        }
    }
}

/// Alternating keys and values as pairs.
fn pairs(items: Vec<Id>) -> Result<Vec<(Id, Id)>, String> {
    if !items.len().is_multiple_of(2) {
        return Err("a dict with a key but no value".into());
    }
    Ok(items.chunks_exact(2).map(|kv| (kv[0], kv[1])).collect())
}
