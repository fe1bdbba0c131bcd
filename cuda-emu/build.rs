//! Compiles clipft's CUDA kernels, the `.cu` files themselves, as C++ for the CPU: each file
//! after the prelude `cxx/emu.h` (CUDA's qualifiers, thread coordinates, barriers and
//! intrinsics), with `cxx/include` standing in for cuda_fp16.h, cuda_bf16.h and mma.h. Two
//! rewrites only: `extern __shared__ T name[];` becomes a pointer to the launch's dynamic
//! shared memory, and each file gets a table of its `extern "C"` kernels (found in the
//! preprocessed source) with their C++ signatures, which launches are checked against.

use std::path::PathBuf;

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let kernels = here.join("../src/model/kernels/cuda");
    let cxx = here.join("cxx");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    println!("cargo:rerun-if-changed={}", kernels.display());
    println!("cargo:rerun-if-changed={}", cxx.display());
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .opt_level(2)
            // The kernels' arithmetic as written: no fused multiply-adds the source does not ask
            // for (fmaf is exact either way), no fast math.
            .flag("-ffp-contract=off")
            .flag("-fno-fast-math")
            // What nvcc does not warn about either.
            .flag("-Wno-unused-parameter")
            .flag("-Wno-unknown-pragmas")
            .flag("-Wno-sign-compare")
            .include(&cxx)
            .include(cxx.join("include"))
            .include(&kernels);
        b
    };
    // clipft's kernels, and the emulator's own test kernels (cxx/selftest).
    let mut sources = Vec::new();
    for dir in [&kernels, &cxx.join("selftest")] {
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "cu"))
            .collect();
        found.sort();
        sources.extend(found);
    }
    let mut build = base();
    build.file(cxx.join("runtime.cc"));
    let mut tables = Vec::new();
    for src in &sources {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or("kernel file name")?
            .to_owned();
        let tu = out.join(format!("{stem}.cc"));
        let body = dynamic_shared(&std::fs::read_to_string(src)?)?;
        let text = format!(
            "#include \"emu.h\"\n#line 1 \"{}\"\n{body}\n",
            src.display()
        );
        std::fs::write(&tu, &text)?;
        let expanded =
            String::from_utf8(base().define("CLIPFT_EMU_SCAN", None).file(&tu).expand())?;
        let names = kernel_names(&expanded);
        if names.is_empty() {
            return Err(format!("no extern \"C\" kernels in {}", src.display()).into());
        }
        let entries: Vec<String> = names
            .iter()
            .map(|(k, bound)| format!("CLIPFT_EMU_ENTRY({k}, {bound})"))
            .collect();
        let table = format!(
            "{text}\nextern \"C\" const clipft_emu::Entry* clipft_emu_table_{stem}(size_t* n) {{\n    \
             static const clipft_emu::Entry t[] = {{{}}};\n    *n = {};\n    return t;\n}}\n",
            entries.join(", "),
            names.len()
        );
        std::fs::write(&tu, table)?;
        build.file(&tu);
        tables.push(stem);
    }
    let decls: String = tables
        .iter()
        .map(|s| format!("extern \"C\" const clipft_emu::Entry* clipft_emu_table_{s}(size_t*);\n"))
        .collect();
    let calls: String = tables
        .iter()
        .map(|s| format!("&clipft_emu_table_{s}, "))
        .collect();
    let find = format!(
        "#include \"emu.h\"\n#include <cstring>\n{decls}\
         extern \"C\" const clipft_emu::Entry* clipft_emu_find(const char* name) {{\n    \
         using Table = const clipft_emu::Entry* (*)(size_t*);\n    \
         static const Table tables[] = {{{calls}}};\n    \
         for (Table t : tables) {{\n        size_t n = 0;\n        const clipft_emu::Entry* e = t(&n);\n        \
         for (size_t i = 0; i < n; ++i)\n            if (std::strcmp(e[i].name, name) == 0) return &e[i];\n    }}\n    \
         return nullptr;\n}}\n"
    );
    let find_tu = out.join("tables.cc");
    std::fs::write(&find_tu, find)?;
    build.file(&find_tu);
    build.compile("clipft_cuda_emu");
    Ok(())
}

/// `extern __shared__ [__align__(n)] T name[];` -> `T* name = static_cast<T*>(...)`: the
/// launch's dynamic shared memory (aligned to 64 bytes).
fn dynamic_shared(src: &str) -> Result<String, Error> {
    const KEY: &str = "extern __shared__";
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(at) = rest.find(KEY) {
        out.push_str(&rest[..at]);
        let end = rest[at..]
            .find(';')
            .ok_or("extern __shared__ without ';'")?
            + at;
        let decl = rest[at + KEY.len()..end].trim();
        let decl = match decl.strip_prefix("__align__(") {
            Some(d) => d.split_once(')').ok_or("__align__(")?.1.trim(),
            None => decl,
        };
        let decl = decl
            .strip_suffix("[]")
            .ok_or_else(|| format!("extern __shared__ array expected: {decl}"))?;
        let (ty, name) = decl
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("extern __shared__ declaration: {decl}"))?;
        let ty = ty.trim();
        out.push_str(&format!(
            "{ty}* {name} = static_cast<{ty}*>(clipft_emu::dynamic_shared())"
        ));
        rest = &rest[end..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The `clipft_*` (and the self-tests' `emu_selftest_*`) functions the preprocessed source
/// defines as `extern "C" void`, each with its `__launch_bounds__` expression (`1024`, CUDA's
/// most, without one).
fn kernel_names(expanded: &str) -> Vec<(String, String)> {
    const BOUNDS: &str = "CLIPFT_EMU_LAUNCH_BOUNDS";
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names: Vec<(String, String)> = Vec::new();
    let mut rest = expanded;
    while let Some(at) = rest.find("extern \"C\"") {
        rest = &rest[at + 10..];
        let Some(mut after) = rest.trim_start().strip_prefix("void") else {
            continue;
        };
        after = after.trim_start();
        let mut bound = "1024".to_owned();
        if let Some(b) = after.strip_prefix(BOUNDS) {
            let b = b.trim_start();
            let Some(open) = b.strip_prefix('(') else {
                continue;
            };
            let mut depth = 1;
            let end = open.char_indices().find_map(|(i, c)| {
                depth += match c {
                    '(' => 1,
                    ')' => -1,
                    _ => 0,
                };
                (depth == 0).then_some(i)
            });
            let Some(end) = end else { continue };
            bound = format!("({})", &open[..end]);
            after = open[end + 1..].trim_start();
        }
        let name = ident(after);
        let ours = name.starts_with("clipft_") || name.starts_with("emu_selftest_");
        if ours && !names.iter().any(|(n, _)| *n == name) {
            names.push((name, bound));
        }
    }
    names
}
