//! Reading the columns Tessera needs out of Hugging Face `datasets` Arrow
//! files (IPC *stream* format). A column is named by a path: `["question"]`,
//! or `["choices", "text"]` for a field inside a struct column. Anything of
//! an unexpected type is an error naming the column, not a panic: the files
//! come from a package we do not control.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_ipc::reader::StreamReader;

/// Every record batch of an Arrow stream file.
pub fn read_batches(path: &Path) -> Result<Vec<RecordBatch>, String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let reader = StreamReader::try_new(BufReader::new(f), None)
        .map_err(|e| format!("{}: not an Arrow stream: {e}", path.display()))?;
    reader
        .map(|b| b.map_err(|e| format!("{}: {e}", path.display())))
        .collect()
}

fn column(batch: &RecordBatch, path: &[&str]) -> Result<ArrayRef, String> {
    let name = path.join(".");
    let (first, rest) = path.split_first().ok_or("empty column path")?;
    let mut col = batch
        .column_by_name(first)
        .cloned()
        .ok_or_else(|| format!("no column `{name}`"))?;
    for field in rest {
        let s = col
            .as_struct_opt()
            .ok_or_else(|| format!("column `{name}`: `{field}`'s parent is not a struct"))?;
        col = s
            .column_by_name(field)
            .cloned()
            .ok_or_else(|| format!("no column `{name}`"))?;
    }
    Ok(col)
}

fn string_at(a: &dyn Array, i: usize) -> Option<String> {
    if a.is_null(i) {
        return None;
    }
    if let Some(s) = a.as_string_opt::<i32>() {
        return Some(s.value(i).to_string());
    }
    a.as_string_opt::<i64>().map(|s| s.value(i).to_string())
}

/// A string column (nulls become empty strings).
pub fn strings(batch: &RecordBatch, path: &[&str]) -> Result<Vec<String>, String> {
    let col = column(batch, path)?;
    if col.as_string_opt::<i32>().is_none() && col.as_string_opt::<i64>().is_none() {
        return Err(format!("column `{}` is not a string column", path.join(".")));
    }
    Ok((0..col.len())
        .map(|i| string_at(col.as_ref(), i).unwrap_or_default())
        .collect())
}

/// A list-of-strings column.
pub fn string_lists(batch: &RecordBatch, path: &[&str]) -> Result<Vec<Vec<String>>, String> {
    let col = column(batch, path)?;
    let list = col
        .as_list_opt::<i32>()
        .ok_or_else(|| format!("column `{}` is not a list column", path.join(".")))?;
    (0..list.len())
        .map(|i| {
            let values = list.value(i);
            if values.as_string_opt::<i32>().is_none() && values.as_string_opt::<i64>().is_none() {
                return Err(format!("column `{}` is not a list of strings", path.join(".")));
            }
            Ok((0..values.len())
                .filter_map(|j| string_at(values.as_ref(), j))
                .collect())
        })
        .collect()
}

/// A boolean column (nulls are false).
pub fn bools(batch: &RecordBatch, path: &[&str]) -> Result<Vec<bool>, String> {
    let col = column(batch, path)?;
    let b = col
        .as_boolean_opt()
        .ok_or_else(|| format!("column `{}` is not a boolean column", path.join(".")))?;
    Ok((0..b.len()).map(|i| !b.is_null(i) && b.value(i)).collect())
}

/// An integer column (class labels).
pub fn ints(batch: &RecordBatch, path: &[&str]) -> Result<Vec<i64>, String> {
    let col = column(batch, path)?;
    match col.data_type() {
        arrow_schema::DataType::Int64 => {
            let a = col.as_primitive::<Int64Type>();
            Ok((0..a.len()).map(|i| a.value(i)).collect())
        }
        arrow_schema::DataType::Int32 => {
            let a = col.as_primitive::<arrow_array::types::Int32Type>();
            Ok((0..a.len()).map(|i| a.value(i) as i64).collect())
        }
        other => Err(format!("column `{}` is {other}, not an integer column", path.join("."))),
    }
}
