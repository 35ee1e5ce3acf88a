//! Bad input gets a clear error that names the file, tensor or key and what was expected;
//! never a panic, never a silently wrong answer.

use std::path::{Path, PathBuf};
use std::process::Command;

use invdiff::config::UNetConfig;
use invdiff::cpu::CpuUnet;
use invdiff::io::safetensors;
use invdiff::model::Model;
use invdiff::Tensor;

mod common;
use common::{fixture, TempDir};

/// A fresh scratch folder for one test, removed when it ends.
fn scratch(name: &str) -> TempDir {
    TempDir::new("errors", name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn err_text<T>(r: invdiff::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} does not mention {p:?}");
    }
}

/// Runs the CLI, expecting failure; returns stderr.
fn cli_fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_invdiff"))
        .args(args)
        .output()
        .unwrap();
    assert!(!out.status.success(), "invdiff {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !err.contains("panicked"),
        "invdiff {args:?} panicked: {err}"
    );
    err
}

/// Runs the CLI with `args` and environment `env`, which must succeed; returns stdout.
fn cli_ok(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_invdiff"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "invdiff {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn missing_model_folder_and_missing_weights() {
    let msg = err_text(Model::load(Path::new("/nonexistent/model")));
    assert_mentions(&msg, &["/nonexistent/model", "not found"]);
    let d = scratch("noweights");
    std::fs::copy(
        fixture("models/google_tiny/config.json"),
        d.join("config.json"),
    )
    .unwrap();
    let msg = err_text(Model::load(&d));
    assert_mentions(
        &msg,
        &["no weights found", "diffusion_pytorch_model.safetensors"],
    );
}

#[test]
fn truncated_checkpoint() {
    let d = scratch("truncated");
    copy_dir(&fixture("models/google_tiny"), &d);
    let w = d.join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let msg = err_text(Model::load(&d));
    assert_mentions(&msg, &["diffusion_pytorch_model.safetensors"]);
}

#[test]
fn mis_shaped_missing_and_extra_tensors_are_named() {
    let d = scratch("misshaped");
    copy_dir(&fixture("models/google_tiny"), &d);
    let w = d.join("diffusion_pytorch_model.safetensors");
    let f = safetensors::read(&w).unwrap();
    let mut tensors: Vec<(String, Tensor)> = f
        .names()
        .into_iter()
        .filter(|n| *n != "conv_out.bias")
        .map(|n| (n.to_string(), f.get(n).unwrap()))
        .collect();
    for (n, t) in tensors.iter_mut() {
        if n == "conv_in.weight" {
            *t = Tensor::zeros(vec![32, 3, 5, 5]);
        }
    }
    tensors.push(("extra.weight".to_string(), Tensor::zeros(vec![2])));
    let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    safetensors::write(&w, &refs, None).unwrap();
    let msg = err_text(Model::load(&d));
    assert_mentions(
        &msg,
        &[
            "conv_in.weight",
            "expected [32, 3, 3, 3], found [32, 3, 5, 5]",
            "missing",
            "conv_out.bias",
            "unexpected",
            "extra.weight",
        ],
    );
}

#[test]
fn unsupported_config_keys_and_values_are_named() {
    let base = std::fs::read_to_string(fixture("models/google_tiny/config.json")).unwrap();
    for (key, value, expect) in [
        (
            "resnet_time_scale_shift",
            "\"scale_shift\"",
            "resnet_time_scale_shift",
        ),
        ("time_embedding_type", "\"fourier\"", "fourier"),
        ("class_embed_type", "\"timestep\"", "class_embed_type"),
        ("some_future_key", "1", "some_future_key"),
        ("norm_num_groups", "7", "norm_num_groups"),
        ("downsample_padding", "2", "downsample_padding"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
        v[key] = serde_json::from_str(value).unwrap();
        let msg = err_text(UNetConfig::from_json(&v.to_string(), Path::new("cfg.json")));
        assert_mentions(&msg, &["cfg.json", expect]);
    }
    let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
    v["down_block_types"][0] = "CrossAttnDownBlock2D".into();
    let msg = err_text(UNetConfig::from_json(&v.to_string(), Path::new("cfg.json")));
    assert_mentions(&msg, &["down_block_types", "CrossAttnDownBlock2D"]);
}

/// `info` on a model whose sample size the network cannot take says so instead of counting the
/// work at that size.
#[test]
fn info_says_when_the_sample_size_does_not_fit() {
    let d = scratch("info-sample-size");
    let src = fixture("models/google_tiny");
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        d.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    v["sample_size"] = serde_json::json!([36, 32]);
    std::fs::write(d.join("config.json"), v.to_string()).unwrap();
    let text = cli_ok(&["info", "--model", d.to_str().unwrap()], &[]);
    assert_mentions(
        &text,
        &[
            "work per image at the sample size: none",
            "36x32",
            "multiples of 8",
        ],
    );
}

/// Sizes no model has are refused by name before anything is built from them: a layer count
/// of 2^40 would build for ever, a width of 2^62 would wrap the time embedding's default width
/// (four times the first block's) to 0.
#[test]
fn implausible_config_sizes_are_named() {
    let base = std::fs::read_to_string(fixture("models/google_tiny/config.json")).unwrap();
    let huge = 1u64 << 62;
    for (key, value, expect) in [
        ("layers_per_block", (1u64 << 40).to_string(), "1024"),
        (
            "block_out_channels",
            format!("[{huge}, 32, 32, 32]"),
            "1048576",
        ),
        ("sample_size", format!("[{huge}, 32]"), "1048576"),
        ("in_channels", huge.to_string(), "1048576"),
        ("out_channels", huge.to_string(), "1048576"),
        ("time_embedding_dim", huge.to_string(), "1048576"),
        ("attention_head_dim", huge.to_string(), "1048576"),
        (
            "block_out_channels",
            format!("[{}]", ["32"; 17].join(", ")),
            "at most 16",
        ),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&base).unwrap();
        v[key] = serde_json::from_str(&value).unwrap();
        if key == "block_out_channels" && !value.contains(&huge.to_string()) {
            v["down_block_types"] = serde_json::json!(vec!["DownBlock2D"; 17]);
            v["up_block_types"] = serde_json::json!(vec!["UpBlock2D"; 17]);
        }
        let msg = err_text(UNetConfig::from_json(&v.to_string(), Path::new("cfg.json")));
        assert_mentions(&msg, &["cfg.json", key, expect]);
    }
}

#[test]
fn bad_input_sizes_shapes_and_values() {
    let model = Model::load(&fixture("models/google_tiny")).unwrap();
    let unet = CpuUnet::new(&model);
    // google_tiny halves the resolution 3 times: sizes must be multiples of 8.
    let msg = err_text(unet.forward(&Tensor::zeros(vec![1, 3, 30, 32]), &[10.0]));
    assert_mentions(&msg, &["30x32", "multiples of 8"]);
    let msg = err_text(unet.forward(&Tensor::zeros(vec![1, 4, 32, 32]), &[10.0]));
    assert_mentions(&msg, &["3 input channels", "got 4"]);
    let msg = err_text(unet.forward(&Tensor::zeros(vec![3, 32, 32]), &[10.0]));
    assert_mentions(&msg, &["sample", "[N,C,H,W]"]);
    let msg = err_text(unet.forward(&Tensor::zeros(vec![2, 3, 32, 32]), &[1.0, 2.0, 3.0]));
    assert_mentions(&msg, &["timestep", "got 3"]);
    let mut x = Tensor::zeros(vec![1, 3, 32, 32]);
    x.data_mut()[5] = f32::NAN;
    let msg = err_text(unet.forward(&x, &[10.0]));
    assert_mentions(&msg, &["NaN"]);
    let (_, tape) = unet
        .forward_recording(&Tensor::zeros(vec![1, 3, 32, 32]), &[10.0])
        .unwrap();
    let msg = err_text(unet.vjp(tape, &Tensor::zeros(vec![1, 3, 16, 16])));
    assert_mentions(&msg, &["cotangent", "[1, 3, 32, 32]"]);
}

#[test]
fn cli_eps_reports_the_input_file() {
    let d = scratch("cli-eps");
    let input = d.join("in.safetensors");
    safetensors::write(
        &input,
        &[("sample", &Tensor::zeros(vec![1, 3, 32, 32]))],
        None,
    )
    .unwrap();
    let model = fixture("models/google_tiny");
    let out = d.join("out.safetensors");
    let err = cli_fails(&[
        "eps",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ]);
    assert_mentions(&err, &["in.safetensors", "timestep"]);
    let err = cli_fails(&[
        "eps",
        "--model",
        model.to_str().unwrap(),
        "--input",
        "/nonexistent.safetensors",
        "--output",
        out.to_str().unwrap(),
    ]);
    assert_mentions(&err, &["/nonexistent.safetensors"]);
    let err = cli_fails(&[
        "eps",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--device",
        "tpu",
    ]);
    assert_mentions(&err, &["tpu", "auto, cpu, cuda"]);
}

/// `invdiff restore` on the google_tiny fixture model, 2 CPU steps, expected to fail; returns
/// stderr.
fn restore_fails(method: &str, measurement: &Path, output: &Path, extra: &[&str]) -> String {
    let model = fixture("models/google_tiny");
    let mut args = vec![
        "restore",
        "--model",
        model.to_str().unwrap(),
        "--method",
        method,
        "--measurement",
        measurement.to_str().unwrap(),
        "--steps",
        "2",
        "--output",
        output.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    cli_fails(&args)
}

#[test]
fn cli_restore_rejects_bad_measurements() {
    let d = scratch("cli-restore");
    let inputs = fixture("trajectories/inputs.safetensors");
    let out = d.join("out.png");
    // A kernel larger than the 32x32 images.
    let big = d.join("big.safetensors");
    let big_kernel = Tensor::full(vec![1, 1, 40, 40], 1.0 / 1600.0);
    safetensors::write(&big, &[("kernel", &big_kernel)], None).unwrap();
    let err = restore_fails("dps", &inputs, &d, &["--kernel", big.to_str().unwrap()]);
    assert_mentions(&err, &["40", "32"]);
    // NaN in the measurement.
    let mut y = Tensor::full(vec![1, 3, 32, 32], 0.5);
    y.data_mut()[7] = f32::NAN;
    let nan = d.join("nan.safetensors");
    let k = Tensor::full(vec![1, 1, 3, 3], 1.0 / 9.0);
    safetensors::write(&nan, &[("measurement", &y), ("kernel", &k)], None).unwrap();
    assert_mentions(&restore_fails("pigdm", &nan, &out, &[]), &["NaN"]);
    // A size the network cannot take, an unknown method, and ground truths that do not fit.
    let odd = d.join("odd.safetensors");
    let odd_y = Tensor::full(vec![1, 3, 30, 32], 0.5);
    safetensors::write(&odd, &[("measurement", &odd_y), ("kernel", &k)], None).unwrap();
    let err = restore_fails("dps", &odd, &out, &[]);
    assert_mentions(&err, &["30x32", "multiples of 8"]);
    let err = restore_fails("magic", &odd, &out, &[]);
    assert_mentions(&err, &["magic", "dps", "pigdm"]);
    let err = restore_fails("dps", &inputs, &d, &["--truth", odd.to_str().unwrap()]);
    assert_mentions(&err, &["odd.safetensors", "no tensor named truth or sharp"]);
    let one = d.join("one.safetensors");
    let truth = Tensor::full(vec![1, 3, 32, 32], 0.5);
    safetensors::write(&one, &[("truth", &truth)], None).unwrap();
    let err = restore_fails("dps", &inputs, &d, &["--truth", one.to_str().unwrap()]);
    assert_mentions(&err, &["2 measurements but 1 ground-truth"]);
    // Half precision is a GPU feature, and an unknown precision is named.
    let err = restore_fails("dps", &inputs, &d, &["--precision", "bf16"]);
    assert_mentions(&err, &["bf16", "CUDA GPU", "fp32"]);
    let err = restore_fails("dps", &inputs, &d, &["--precision", "fp8"]);
    assert_mentions(&err, &["fp8", "bf16"]);
}

/// Writes a 32x32 measurement, flat grey, with a 3x3 box kernel, to `path`; returns it.
fn write_measurement(path: &Path) -> PathBuf {
    let y = Tensor::full(vec![1, 3, 32, 32], 0.5);
    let k = Tensor::full(vec![1, 1, 3, 3], 1.0 / 9.0);
    safetensors::write(path, &[("measurement", &y), ("kernel", &k)], None).unwrap();
    path.to_path_buf()
}

/// Every command checks where it will write before it loads anything, so that a run of minutes
/// or hours does not end on a typo in an output's name: here the model folder does not even
/// exist, and the output is what each error names.
#[test]
fn cli_checks_its_outputs_before_any_work() {
    let d = scratch("cli-outputs");
    let (no_model, missing) = ("/nonexistent-model", d.join("no-such-folder"));
    let in_missing = |name: &str| missing.join(name).to_str().unwrap().to_string();
    let (png, report, json) = (
        in_missing("x.png"),
        in_missing("r.json"),
        in_missing("b.json"),
    );
    let sample = |out: &str| cli_fails(&["sample", "--model", no_model, "--output", out]);
    assert_mentions(
        &sample(&png),
        &["x.png", "no-such-folder", "does not exist"],
    );
    assert_mentions(
        &sample("x.bmp"),
        &["x.bmp", "unknown output format", ".png"],
    );
    assert_mentions(&sample(d.to_str().unwrap()), &["unknown output format"]);
    let folder_png = d.join("folder.png");
    std::fs::create_dir_all(&folder_png).unwrap();
    assert_mentions(
        &sample(folder_png.to_str().unwrap()),
        &["folder.png", "is a folder"],
    );

    let restore = |measurement: &Path, extra: &[&str]| {
        let mut args = vec![
            "restore",
            "--model",
            no_model,
            "--method",
            "dps",
            "--measurement",
            measurement.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        cli_fails(&args)
    };
    // inputs.safetensors holds two measurements: the output is a folder, the report a file.
    let two = fixture("trajectories/inputs.safetensors");
    let out = d.join("restored");
    let out = out.to_str().unwrap();
    assert_mentions(
        &restore(&two, &["--output", out, "--report", &report]),
        &["r.json", "does not exist"],
    );
    let one = write_measurement(&d.join("one.safetensors"));
    assert_mentions(
        &restore(&one, &["--output", &png]),
        &["x.png", "does not exist"],
    );
    assert_mentions(
        &restore(&one, &["--output", "x.tiff"]),
        &["x.tiff", "unknown output format"],
    );

    let err = cli_fails(&[
        "eps",
        "--model",
        no_model,
        "--input",
        "in.safetensors",
        "--output",
        "e.png",
    ]);
    assert_mentions(&err, &["e.png", "unknown output format", ".safetensors"]);
    let err = cli_fails(&["bench", "--model", no_model, "--json", &json]);
    assert_mentions(&err, &["b.json", "does not exist"]);
    let err = cli_fails(&["kernel", "--kind", "gaussian", "--output", "k.txt"]);
    assert_mentions(&err, &["k.txt", ".safetensors, .npy or .png"]);
    let err = cli_fails(&[
        "degrade",
        "--image",
        "/nonexistent.png",
        "--kernel",
        "/nonexistent.npy",
        "--output",
        &png,
    ]);
    assert_mentions(&err, &["x.png", "does not exist"]);
    // Extensions are matched whatever their case, as the image writer matches them.
    let upper = d.join("K.PNG");
    cli_ok(
        &[
            "kernel",
            "--kind",
            "gaussian",
            "--size",
            "5",
            "--output",
            upper.to_str().unwrap(),
        ],
        &[],
    );
    assert!(upper.is_file());
}

/// Guidance and noise settings that would make a run diverge, or that a batch cannot hold, are
/// refused before the first step with what was wrong, where before NaN ran through a step (or
/// a NaN noise level was reported as two images' levels differing).
#[test]
fn cli_restore_refuses_settings_that_are_not_numbers() {
    let d = scratch("cli-restore-settings");
    let one = write_measurement(&d.join("one.safetensors"));
    let out = d.join("x.png");
    let err = restore_fails("pigdm", &one, &out, &["--sigma=nan"]);
    assert_mentions(&err, &["--sigma", "finite number >= 0", "NaN"]);
    for scale in ["--scale=inf", "--scale=-1"] {
        let err = restore_fails("dps", &one, &out, &[scale]);
        assert_mentions(&err, &["guidance scale", "finite number >= 0"]);
    }
    let err = restore_fails("dps", &one, &out, &["--scheduler", "ddim", "--eta", "2"]);
    assert_mentions(&err, &["DDIM eta 2", "eta <= 1"]);
    let two_sigmas = d.join("two-sigmas.safetensors");
    let y = Tensor::full(vec![1, 3, 32, 32], 0.5);
    let k = Tensor::full(vec![1, 1, 3, 3], 1.0 / 9.0);
    let with_sigmas = |values: Vec<f32>| {
        let sigma = Tensor::new(vec![values.len()], values).unwrap();
        let tensors = [("measurement", &y), ("kernel", &k), ("sigma", &sigma)];
        safetensors::write(&two_sigmas, &tensors, None).unwrap();
    };
    // A data set's per-image `sigma`: one level when its values are alike; when they differ,
    // ΠGDM needs --sigma, and DPS, which reads no noise level, runs.
    with_sigmas(vec![0.05, 0.05]);
    restore_ok("pigdm", &two_sigmas, &out, &[]);
    with_sigmas(vec![0.05, 0.1]);
    let err = restore_fails("pigdm", &two_sigmas, &out, &[]);
    let expected = [
        "two-sigmas.safetensors",
        "`sigma`",
        "[2]",
        "differ",
        "--sigma",
    ];
    assert_mentions(&err, &expected);
    restore_ok("pigdm", &two_sigmas, &out, &["--sigma", "0.1"]);
    restore_ok("dps", &two_sigmas, &out, &[]);
}

/// `invdiff restore` on the google_tiny fixture model, 2 CPU steps, expected to succeed.
fn restore_ok(method: &str, measurement: &Path, output: &Path, extra: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_invdiff"))
        .args(["restore", "--model"])
        .arg(fixture("models/google_tiny"))
        .args(["--method", method, "--steps", "2", "--device", "cpu"])
        .arg("--measurement")
        .arg(measurement)
        .arg("--output")
        .arg(output)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "restore {measurement:?} -> {output:?} {extra:?}: {err}"
    );
}

/// Where restore writes: several inputs to a folder it makes, with a report that may go in it;
/// one input to a folder when --output is one (existing, or ending in a separator); and a
/// measurement file's extension in any case.
#[test]
fn cli_restore_writes_where_it_is_told() {
    let d = scratch("cli-restore-outputs");
    let out = d.join("new").join("out");
    let report = out.join("report.json");
    let two = fixture("trajectories/inputs.safetensors");
    restore_ok("dps", &two, &out, &["--report", report.to_str().unwrap()]);
    for f in ["inputs_0.png", "inputs_1.png", "report.json"] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let one = write_measurement(&d.join("one.SAFETENSORS"));
    // A folder named with a dot, not yet made.
    let slash = PathBuf::from(format!("{}/", d.join("run.v2").display()));
    restore_ok("dps", &one, &slash, &[]);
    assert!(d.join("run.v2").join("one.png").is_file());
    restore_ok("dps", &one, &out, &[]);
    assert!(out.join("one.png").is_file());
}

/// A folder whose second image the network cannot take, or whose ground truth does not match
/// its measurement, fails before the first image is restored (it failed after it).
#[test]
fn cli_restore_checks_every_image_before_the_first() {
    let d = scratch("cli-restore-folder");
    let (inputs, truths) = (d.join("in"), d.join("truth"));
    std::fs::create_dir_all(&inputs).unwrap();
    std::fs::create_dir_all(&truths).unwrap();
    let save = |path: PathBuf, h: usize, w: usize| {
        invdiff::io::image::save_image(&path, &Tensor::full(vec![1, 3, h, w], 0.5)).unwrap()
    };
    save(inputs.join("a.png"), 32, 32);
    save(inputs.join("b.png"), 30, 32);
    let kernel = d.join("k.safetensors");
    let k = Tensor::full(vec![1, 1, 3, 3], 1.0 / 9.0);
    safetensors::write(&kernel, &[("kernel", &k)], None).unwrap();
    let out = d.join("out");
    let kernel_arg = ["--kernel", kernel.to_str().unwrap()];
    let err = restore_fails("dps", &inputs, &out, &kernel_arg);
    assert_mentions(&err, &["b:", "30x32", "multiples of 8"]);
    assert!(
        !out.join("a.png").exists(),
        "a was restored before b was checked"
    );

    save(inputs.join("b.png"), 32, 32);
    save(truths.join("a.png"), 32, 32);
    save(truths.join("b.png"), 16, 16);
    let truth_arg = ["--truth", truths.to_str().unwrap()];
    let err = restore_fails("dps", &inputs, &out, &[kernel_arg, truth_arg].concat());
    assert_mentions(&err, &["b:", "ground truth", "16, 16", "32, 32"]);
    assert!(
        !out.join("a.png").exists(),
        "a was restored before b was checked"
    );

    // Two inputs of one name would write one output, and so would one input's strip and
    // another named after it.
    save(inputs.join("a.jpg"), 32, 32);
    let err = restore_fails("dps", &inputs, &out, &kernel_arg);
    assert_mentions(&err, &["inputs a and a", "a.png"]);
    std::fs::remove_file(inputs.join("a.jpg")).unwrap();
    save(inputs.join("a_strip.png"), 32, 32);
    let err = restore_fails(
        "dps",
        &inputs,
        &out,
        &[&kernel_arg[..], &["--strip"]].concat(),
    );
    assert_mentions(&err, &["inputs a and a_strip", "a_strip.png"]);
}

/// An image whose run diverges (here ΠGDM on a measurement of 3e38) costs that image, not the
/// others: the run restores the rest, writes the report with the failure in it, says which
/// image failed and why, and exits with an error. The CPU reports the divergence, as the GPU's
/// loop does (the host loop used to stop on the network refusing a non-finite cotangent); a
/// run of one image fails with the divergence alone.
#[test]
fn cli_restore_goes_on_past_a_diverged_image() {
    let d = scratch("cli-restore-diverged");
    let measurements = d.join("div.safetensors");
    let mut y = Tensor::full(vec![2, 3, 32, 32], 0.5);
    y.data_mut()[3 * 32 * 32..].fill(3e38);
    let k = Tensor::full(vec![1, 1, 3, 3], 1.0 / 9.0);
    safetensors::write(&measurements, &[("measurement", &y), ("kernel", &k)], None).unwrap();
    let (out, report) = (d.join("out"), d.join("report.json"));
    let err = restore_fails(
        "pigdm",
        &measurements,
        &out,
        &["--report", report.to_str().unwrap()],
    );
    assert_mentions(
        &err,
        &[
            "div_1: not restored: sampling diverged",
            "1 of 2 image(s) not restored",
        ],
    );
    assert!(out.join("div_0.png").is_file() && !out.join("div_1.png").exists());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["failed"], 1);
    assert!(r["images"][0]["error"].is_null());
    assert!(r["images"][1]["error"]
        .as_str()
        .unwrap()
        .contains("diverged"));

    let one = d.join("one.safetensors");
    let y = Tensor::full(vec![1, 3, 32, 32], 3e38);
    safetensors::write(&one, &[("measurement", &y), ("kernel", &k)], None).unwrap();
    let err = restore_fails("pigdm", &one, &d.join("one.png"), &[]);
    assert_mentions(&err, &["error: sampling diverged at step"]);
    assert_eq!(err.matches("diverged").count(), 1, "{err}");
    assert!(!d.join("one.png").exists());
}

/// `bench --profile` times GPU launches: on the CPU it is an error that points at the CPU's own
/// per-op timing instead of a silent no-op; so are `--trace`, which records CUDA graph replays,
/// and `--stalls`, which samples GPU warps; a peak rate must be positive, and a sampling period
/// one CUPTI takes.
#[test]
fn cli_bench_profile_is_gpu_only() {
    let model = fixture("models/google_tiny");
    let bench = |extra: &[&str]| {
        let mut args = vec![
            "bench",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
        ];
        args.extend_from_slice(extra);
        cli_fails(&args)
    };
    let err = bench(&["--profile"]);
    assert_mentions(
        &err,
        &["--profile", "CUDA device", "CPU", "INVDIFF_PROFILE=1"],
    );
    let err = bench(&["--trace", "trace.json"]);
    assert_mentions(&err, &["--trace", "CUDA graph", "CUDA device", "CPU"]);
    let err = bench(&["--stalls", "stalls.json"]);
    assert_mentions(&err, &["--stalls", "GPU kernels", "CUDA device", "CPU"]);
    let err = bench(&["--stall-period", "4"]);
    assert_mentions(&err, &["--stall-period", "5..=31"]);
    let err = bench(&["--stall-seconds", "0"]);
    assert_mentions(&err, &["--stall-seconds", "positive"]);
    let err = bench(&["--peak-tflops=0"]);
    assert_mentions(&err, &["--peak-tflops 0", "positive"]);
}

/// An image or batch too large for this machine's memory is refused before the pass, with what
/// it needs (google_tiny at 4096x4096 has 4M attention tokens at its second level), where
/// before the allocation failed and the process aborted. (Linux: the machine's memory is read from /proc.)
#[cfg(target_os = "linux")]
#[test]
fn cli_refuses_a_pass_larger_than_memory() {
    let model = fixture("models/google_tiny");
    let err = cli_fails(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--size",
        "4096",
        "--steps",
        "1",
    ]);
    assert_mentions(&err, &["4096x4096", "needs at least", "GB this machine"]);
    // Batches no memory holds are refused before their inputs are made (they aborted on the
    // allocation), and so are kernel sizes no image has.
    let batch = "99999999999";
    let m = model.to_str().unwrap();
    let err = cli_fails(&["bench", "--model", m, "--device", "cpu", "--batch", batch]);
    assert_mentions(&err, &["batch of 99999999999", "GB this machine"]);
    let err = cli_fails(&[
        "sample",
        "--model",
        m,
        "--device",
        "cpu",
        "--steps",
        "2",
        "--batch",
        batch,
        "--output",
        "never.png",
    ]);
    assert_mentions(&err, &["batch of 99999999999", "GB this machine"]);
    let err = cli_fails(&[
        "kernel",
        "--kind",
        "gaussian",
        "--size",
        "100001",
        "--output",
        "never.npy",
    ]);
    assert_mentions(&err, &["1..=2048", "100001"]);
}

/// `selftest --only` with a name no group has fails before looking for a GPU, and lists the
/// groups; the CPU is refused by name; `selftest --help` names every group.
#[test]
fn cli_selftest_names_its_groups() {
    let err = cli_fails(&["selftest", "--only", "bogus"]);
    assert_mentions(&err, &["`bogus`", "tensor-core networks", "group norms"]);
    let err = cli_fails(&["selftest", "--device", "cpu"]);
    assert_mentions(&err, &["--device cuda", "cpu"]);
    // (The help wraps its lines wherever the terminal's width puts the breaks.)
    let help = cli_ok(&["selftest", "--help"], &[])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert_mentions(&help, &invdiff::cuda::SELFTEST_GROUPS);
}

/// A misspelt `INVDIFF_*` variable, or a value a switch does not read, would be ignored in
/// silence; `doctor` names them, and lists the variables and values invdiff does read.
#[test]
fn doctor_points_out_unknown_invdiff_variables() {
    let env = [
        ("INVDIFF_HALF_COPy", "1"),
        ("INVDIFF_STREAMS", "2"),
        ("INVDIFF_ROW_EPILOGUE", "off"),
    ];
    let text = cli_ok(&["doctor"], &env);
    assert_mentions(
        &text,
        &[
            "warning: INVDIFF_HALF_COPy is set but invdiff reads no such variable",
            "INVDIFF_HALF_COPY",
            "INVDIFF_STREAMS=2: GPU default",
            "warning: INVDIFF_ROW_EPILOGUE=off means nothing to invdiff, so the default applies \
             (it reads 0, 1)",
        ],
    );
    assert!(!text.contains("INVDIFF_STREAMS=2 means nothing"), "{text}");
}

/// A shape whose element count does not fit in memory's address space is an error, not a
/// wrapped product that an empty data vector would match.
#[test]
fn tensor_shapes_past_the_address_space_are_errors() {
    let msg = err_text(Tensor::new(vec![1usize << 32, 1 << 32], vec![]));
    assert_mentions(
        &msg,
        &["[4294967296, 4294967296]", "more values than memory"],
    );
}
