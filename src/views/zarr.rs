//! OME-Zarr (v2) metadata: the pyramid levels a `.zattrs` declares and how a level's `.zarray`
//! lays out its chunks. Only what an MRC view can serve is accepted; anything else is refused
//! with the reason, and the folder simply shows no view for it.

use serde::Deserialize;
use serde_json::Value;

/// Element type of an array, limited to the types MRC2014 stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `|i1`: MRC mode 0 (masks).
    I8,
    /// `<i2`: MRC mode 1.
    I16,
    /// `<u2`: MRC mode 6 (instance masks, older tomograms).
    U16,
    /// `<f4`: MRC mode 2 (tomograms, tilt series).
    F32,
}

impl Dtype {
    fn parse(text: &str) -> Result<Dtype, String> {
        match text {
            "|i1" | "<i1" | "i1" => Ok(Dtype::I8),
            "<i2" => Ok(Dtype::I16),
            "<u2" => Ok(Dtype::U16),
            "<f4" => Ok(Dtype::F32),
            other => Err(format!("dtype {other:?} has no little-endian MRC mode")),
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::I8 => 1,
            Dtype::I16 | Dtype::U16 => 2,
            Dtype::F32 => 4,
        }
    }

    /// The MRC2014 `mode` storing this type.
    pub fn mrc_mode(self) -> i32 {
        match self {
            Dtype::I8 => 0,
            Dtype::I16 => 1,
            Dtype::F32 => 2,
            Dtype::U16 => 6,
        }
    }

    /// `value` as one little-endian element, if it is representable.
    fn encode(self, value: &Value) -> Result<Vec<u8>, String> {
        let float = match value {
            Value::Null => 0.0,
            Value::Number(n) => n.as_f64().ok_or("fill_value is not a number")?,
            Value::String(s) if self == Dtype::F32 => match s.as_str() {
                "NaN" => f64::NAN,
                "Infinity" => f64::INFINITY,
                "-Infinity" => f64::NEG_INFINITY,
                other => return Err(format!("fill_value {other:?} is not understood")),
            },
            other => return Err(format!("fill_value {other} is not understood")),
        };
        let integer = |min: f64, max: f64| {
            if float.fract() == 0.0 && (min..=max).contains(&float) {
                Ok(float as i64)
            } else {
                Err(format!("fill_value {float} does not fit the dtype"))
            }
        };
        Ok(match self {
            Dtype::I8 => (integer(-128.0, 127.0)? as i8).to_le_bytes().to_vec(),
            Dtype::I16 => (integer(-32768.0, 32767.0)? as i16).to_le_bytes().to_vec(),
            Dtype::U16 => (integer(0.0, 65535.0)? as u16).to_le_bytes().to_vec(),
            Dtype::F32 => (float as f32).to_le_bytes().to_vec(),
        })
    }
}

/// How a level's chunks are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// `"compressor": null`: the chunk is the raw C-order elements.
    Raw,
    /// A Blosc-1 frame (any of its internal compressors and shuffles).
    Blosc,
}

/// One array (one pyramid level): shape, chunking, element type, storage.
#[derive(Clone, Debug, PartialEq)]
pub struct ArrayLayout {
    /// Array shape, slowest axis first (z, y, x).
    pub shape: [u64; 3],
    /// Chunk shape (z, y, x); edge chunks are stored at this full size.
    pub chunks: [u64; 3],
    /// Element type.
    pub dtype: Dtype,
    /// One element of the fill value (what a missing chunk holds), little-endian.
    pub fill: Vec<u8>,
    /// How chunks are encoded.
    pub codec: Codec,
    /// Separator between chunk indices in chunk keys (`/` nested, `.` flat).
    pub separator: char,
}

#[derive(Deserialize)]
struct ZArray {
    zarr_format: u32,
    shape: Vec<u64>,
    chunks: Vec<u64>,
    dtype: String,
    compressor: Option<Compressor>,
    #[serde(default)]
    fill_value: Value,
    order: String,
    #[serde(default)]
    filters: Option<Vec<Value>>,
    #[serde(default)]
    dimension_separator: Option<String>,
}

#[derive(Deserialize)]
struct Compressor {
    id: String,
    #[serde(default)]
    cname: Option<String>,
}

/// The Blosc-internal compressors the bundled c-blosc is built with.
const BLOSC_CNAMES: [&str; 5] = ["lz4", "lz4hc", "zstd", "zlib", "blosclz"];

impl ArrayLayout {
    /// Parses a `.zarray`, refusing (with the reason) what a view cannot serve.
    pub fn parse(json: &[u8]) -> Result<ArrayLayout, String> {
        let zarray: ZArray = serde_json::from_slice(json).map_err(|e| format!("not a Zarr v2 .zarray: {e}"))?;
        if zarray.zarr_format != 2 {
            return Err(format!("zarr_format {} is not 2", zarray.zarr_format));
        }
        let three = |v: &[u64], what: &str| -> Result<[u64; 3], String> {
            match v {
                [z, y, x] if *z > 0 && *y > 0 && *x > 0 => Ok([*z, *y, *x]),
                _ => Err(format!("{what} {v:?} is not three positive numbers")),
            }
        };
        let shape = three(&zarray.shape, "shape")?;
        let chunks = three(&zarray.chunks, "chunks")?;
        if zarray.order != "C" {
            return Err(format!("order {:?} is not C", zarray.order));
        }
        if zarray.filters.as_ref().is_some_and(|f| !f.is_empty()) {
            return Err("filters are not supported".into());
        }
        let codec = match &zarray.compressor {
            None => Codec::Raw,
            Some(c) if c.id == "blosc" && c.cname.as_deref().is_none_or(|n| BLOSC_CNAMES.contains(&n)) => Codec::Blosc,
            Some(c) => return Err(format!("compressor {:?} ({:?}) is not supported", c.id, c.cname)),
        };
        let separator = match zarray.dimension_separator.as_deref() {
            None | Some(".") => '.',
            Some("/") => '/',
            Some(other) => return Err(format!("dimension_separator {other:?} is not supported")),
        };
        let dtype = Dtype::parse(&zarray.dtype)?;
        let fill = dtype.encode(&zarray.fill_value)?;
        // Bounds that keep every size computed from these in range: a view under 1 PiB, a
        // chunk under 2 GiB (Blosc's own limit), and a row of chunks under 1 PiB.
        let product = |dims: &[u64]| dims.iter().try_fold(dtype.size() as u64, |n, &d| n.checked_mul(d));
        let fits = |bytes: Option<u64>, limit: u64| bytes.is_some_and(|b| b < limit);
        if !fits(product(&shape), 1 << 50)
            || !fits(product(&chunks), 1 << 31)
            || !fits(product(&[chunks[0], shape[1], shape[2]]), 1 << 50)
        {
            return Err(format!("shape {shape:?} with chunks {chunks:?} is too large"));
        }
        Ok(ArrayLayout { shape, chunks, dtype, fill, codec, separator })
    }

    /// Number of elements in the array.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Number of elements in one (full-size) chunk.
    pub fn chunk_elements(&self) -> u64 {
        self.chunks.iter().product()
    }
}

/// The key of chunk `index` (z, y, x) of the level stored under `level_prefix`, its indices
/// joined by `separator`.
pub fn chunk_key(level_prefix: &str, index: [u64; 3], separator: char) -> String {
    format!("{level_prefix}{}{separator}{}{separator}{}", index[0], index[1], index[2])
}

/// Where the chunk object `key` lies in a multiscale OME-Zarr: its level's folder
/// (`.../X.zarr/0/`, the first all-digit folder below the `.zarr`) and its path below it
/// (`z/y/x` nested, `z.y.x` flat); `None` for any other key (metadata, labels' own files).
pub fn chunk_of(key: &str) -> Option<(&str, &str)> {
    let store_end = key.find(".zarr/")? + ".zarr/".len();
    let mut level_end = store_end;
    loop {
        let name_end = level_end + key[level_end..].find('/')?;
        let name = &key[level_end..name_end];
        level_end = name_end + 1;
        if !name.is_empty() && name.bytes().all(|b| b.is_ascii_digit()) {
            break;
        }
    }
    let chunk = &key[level_end..];
    chunk.split('/').all(|name| chunk_index(name).is_some()).then_some((&key[..level_end], chunk))
}

/// The indices one name of a chunk path stands for (`3` nested, `1.2.3` flat), in the order
/// they sort in (C order); `None` for a name that is no part of a chunk path.
pub fn chunk_index(name: &str) -> Option<Vec<u64>> {
    // No grid has 2^32 chunks along an axis: steps between indices fit an i64.
    let number =
        |n: &str| n.bytes().all(|b| b.is_ascii_digit()).then(|| n.parse::<u32>().ok().map(u64::from)).flatten();
    name.split('.').map(number).collect()
}

/// The indices of a chunk path (`2/1/3`, `2.1.3`), in order.
pub fn chunk_path_indices(chunk: &str) -> Vec<u64> {
    chunk.split('/').flat_map(|name| chunk_index(name).unwrap_or_default()).collect()
}

/// A chunk path (`2/1/3`, `2.1.3`) with its indices replaced by `indices`, in order.
pub fn chunk_path_with(chunk: &str, indices: &[u64]) -> String {
    let mut indices = indices.iter();
    let names = chunk.split('/').map(|name| {
        let numbers = name.split('.').map(|n| indices.next().map_or_else(|| n.to_owned(), u64::to_string));
        numbers.collect::<Vec<_>>().join(".")
    });
    names.collect::<Vec<_>>().join("/")
}

/// The separator the chunk keys `names` (relative to their level's folder) actually use, if
/// they show one: stores written before `dimension_separator` existed nest keys without saying so.
pub fn separator_in<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<char> {
    names.into_iter().filter(|n| !n.starts_with('.')).find_map(|n| {
        if n.contains('/') {
            Some('/')
        } else {
            n.contains('.').then_some('.')
        }
    })
}

/// One level of a multiscale pyramid as `.zattrs` declares it.
#[derive(Clone, Debug, PartialEq)]
pub struct PyramidLevel {
    /// The level's folder inside the Zarr (`0`, `1`, `2`).
    pub path: String,
    /// Voxel size per axis (z, y, x), in the axes' unit (angstrom for the portal).
    pub scale: [f64; 3],
}

/// The levels of the first multiscale image in a `.zattrs` (OME-NGFF 0.4, axes z, y, x).
pub fn parse_multiscales(json: &[u8]) -> Result<Vec<PyramidLevel>, String> {
    let attrs: Value = serde_json::from_slice(json).map_err(|e| format!(".zattrs is not JSON: {e}"))?;
    let image = attrs.pointer("/multiscales/0").ok_or("no multiscales in .zattrs")?;
    if let Some(axes) = image.get("axes").and_then(Value::as_array) {
        let names: Vec<&str> = axes.iter().map(|a| a.get("name").and_then(Value::as_str).unwrap_or("?")).collect();
        if names != ["z", "y", "x"] {
            return Err(format!("axes {names:?} are not [z, y, x]"));
        }
    }
    let datasets = image.get("datasets").and_then(Value::as_array).ok_or("multiscales has no datasets")?;
    datasets
        .iter()
        .map(|dataset| {
            let path = dataset.get("path").and_then(Value::as_str).ok_or("a dataset has no path")?;
            if path.is_empty() || path.contains(['/', '\0']) || path == "." || path == ".." {
                return Err(format!("dataset path {path:?} is not one folder name"));
            }
            let transforms = dataset.get("coordinateTransformations").and_then(Value::as_array);
            let scale = transforms
                .into_iter()
                .flatten()
                .find(|t| t.get("type").and_then(Value::as_str) == Some("scale"))
                .and_then(|t| t.get("scale")?.as_array()?.iter().map(Value::as_f64).collect::<Option<Vec<f64>>>())
                .ok_or_else(|| format!("dataset {path:?} has no numeric scale"))?;
            match scale[..] {
                [z, y, x] if [z, y, x].iter().all(|s| s.is_finite() && *s > 0.0) => {
                    Ok(PyramidLevel { path: path.to_owned(), scale: [z, y, x] })
                }
                _ => Err(format!("dataset {path:?} scale {scale:?} is not three positive numbers")),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PORTAL_ZARRAY: &str = r#"{"chunks": [256, 256, 256], "compressor": {"blocksize": 0, "clevel": 5,
        "cname": "lz4", "id": "blosc", "shuffle": 1}, "dimension_separator": "/", "dtype": "<f4",
        "fill_value": 0, "filters": null, "order": "C", "shape": [500, 630, 630], "zarr_format": 2}"#;

    #[test]
    fn portal_zarray_is_accepted() {
        let layout = ArrayLayout::parse(PORTAL_ZARRAY.as_bytes()).unwrap();
        assert_eq!(layout.shape, [500, 630, 630]);
        assert_eq!(layout.chunks, [256, 256, 256]);
        assert_eq!((layout.dtype, layout.codec, layout.separator), (Dtype::F32, Codec::Blosc, '/'));
        assert_eq!(layout.fill, 0f32.to_le_bytes());
        assert_eq!(chunk_key("a.zarr/1/", [1, 2, 0], layout.separator), "a.zarr/1/1/2/0");
        assert_eq!(layout.elements(), 500 * 630 * 630);
    }

    #[test]
    fn other_layouts_are_refused_with_a_reason() {
        let with = |from: &str, to: &str| ArrayLayout::parse(PORTAL_ZARRAY.replace(from, to).as_bytes());
        assert!(with("\"<f4\"", "\">f4\"").unwrap_err().contains("dtype"));
        assert!(with("\"<f4\"", "\"<f8\"").unwrap_err().contains("dtype"));
        assert!(with("\"blosc\"", "\"zstd\"").unwrap_err().contains("compressor"));
        assert!(with("\"lz4\"", "\"snappy\"").unwrap_err().contains("compressor"));
        assert!(with("\"C\"", "\"F\"").unwrap_err().contains("order"));
        assert!(with("\"filters\": null", "\"filters\": [{\"id\": \"delta\"}]").unwrap_err().contains("filters"));
        assert!(with("[500, 630, 630]", "[630, 630]").unwrap_err().contains("shape"));
        assert!(with("\"zarr_format\": 2", "\"zarr_format\": 3").unwrap_err().contains("zarr_format"));
        assert!(ArrayLayout::parse(b"{\"zarr_format\": 3}").is_err());
        assert!(with("[500, 630, 630]", "[2, 4294967296, 4294967296]").unwrap_err().contains("too large"));
        assert!(with("[256, 256, 256]", "[2048, 2048, 2048]").unwrap_err().contains("too large"));
    }

    #[test]
    fn fill_values_become_one_element() {
        let layout = |dtype: &str, fill: &str| {
            let json = PORTAL_ZARRAY
                .replace("\"<f4\"", dtype)
                .replace("\"fill_value\": 0", &format!("\"fill_value\": {fill}"));
            ArrayLayout::parse(json.as_bytes()).map(|l| l.fill)
        };
        assert_eq!(layout("\"|i1\"", "-3").unwrap(), (-3i8).to_le_bytes());
        assert_eq!(layout("\"<u2\"", "7").unwrap(), 7u16.to_le_bytes());
        assert_eq!(layout("\"<i2\"", "null").unwrap(), 0i16.to_le_bytes());
        assert!(layout("\"<f4\"", "\"NaN\"").unwrap() == f32::NAN.to_le_bytes());
        assert!(layout("\"|i1\"", "300").is_err());
        assert!(layout("\"<u2\"", "1.5").is_err());
        let flat = PORTAL_ZARRAY.replace("\"dimension_separator\": \"/\",", "");
        assert_eq!(chunk_key("l/", [1, 2, 3], ArrayLayout::parse(flat.as_bytes()).unwrap().separator), "l/1.2.3");
        assert_eq!(separator_in([".zarray", "0/0/1", "0/1/0"]), Some('/'));
        assert_eq!(separator_in([".zarray", ".zattrs", "0.0.1"]), Some('.'));
        assert_eq!(separator_in([".zarray"]), None);
    }

    #[test]
    fn portal_multiscales_give_three_levels() {
        // The shape of `tomogram_zarr_.zattrs.derived.json` in the portal notes.
        let zattrs = br#"{"multiscales": [{"axes": [{"name": "z", "type": "space", "unit": "angstrom"},
            {"name": "y", "type": "space", "unit": "angstrom"}, {"name": "x", "type": "space", "unit": "angstrom"}],
            "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [13.48, 13.48, 13.48]}]},
            {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [26.96, 26.96, 26.96]}]},
            {"path": "2", "coordinateTransformations": [{"type": "scale", "scale": [53.92, 53.92, 53.92]}]}],
            "metadata": {}, "name": "/", "version": "0.4"}]}"#;
        let levels = parse_multiscales(zattrs).unwrap();
        assert_eq!(levels.len(), 3);
        assert_eq!(levels[2], PyramidLevel { path: "2".into(), scale: [53.92, 53.92, 53.92] });
    }

    #[test]
    fn odd_multiscales_are_refused() {
        assert!(parse_multiscales(b"{}").unwrap_err().contains("multiscales"));
        assert!(parse_multiscales(b"not json").is_err());
        let axes = br#"{"multiscales": [{"axes": [{"name": "t"}, {"name": "y"}, {"name": "x"}], "datasets": []}]}"#;
        assert!(parse_multiscales(axes).unwrap_err().contains("axes"));
        let no_scale = br#"{"multiscales": [{"datasets": [{"path": "0"}]}]}"#;
        assert!(parse_multiscales(no_scale).unwrap_err().contains("scale"));
        let bad_path = br#"{"multiscales": [{"datasets": [{"path": "../x",
            "coordinateTransformations": [{"type": "scale", "scale": [1, 1, 1]}]}]}]}"#;
        assert!(parse_multiscales(bad_path).unwrap_err().contains("path"));
    }

    #[test]
    fn chunk_keys_name_their_level_and_place() {
        assert_eq!(chunk_of("10/TS_1/T/100/TS_1.zarr/0/2/1/3"), Some(("10/TS_1/T/100/TS_1.zarr/0/", "2/1/3")));
        assert_eq!(chunk_of("a.zarr/labels/mask/1/0.0.7"), Some(("a.zarr/labels/mask/1/", "0.0.7")));
        for key in ["a.zarr/0/.zarray", "a.zarr/.zattrs", "a.zarr/0/", "a.zarr/0/1/x", "a.mrc", "a.zarr/labels/0"] {
            assert_eq!(chunk_of(key), None, "{key}");
        }
        assert_eq!(chunk_index("1.20.3"), Some(vec![1, 20, 3]));
        assert!(chunk_index("10") > chunk_index("9"), "numbers, not names, give the order");
        assert_eq!(chunk_index("+1"), None);
        assert_eq!(chunk_path_indices("2/10/3"), [2, 10, 3]);
        assert_eq!(chunk_path_with("2/10/3", &[2, 11, 0]), "2/11/0");
        assert_eq!(chunk_path_indices("0.1.2"), [0, 1, 2]);
        assert_eq!(chunk_path_with("0.1.2", &[0, 2, 12]), "0.2.12");
        assert_eq!(chunk_index(""), None);
        assert_eq!(chunk_index("10000000000000000000"), None, "no index of 2^32 or more");
    }
}
