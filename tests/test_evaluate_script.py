"""evaluate_flat.py on two tiny trained pipelines, in this process with a stand-in feature network, each figure checked
against an independent computation (FID, quantized FID, memorization), and its bad-input errors. The real InceptionV3
runs end to end in test_fid.py; evaluate_flat.py runs as a command in test_hub.py and in CI."""

import dataclasses
import inspect
import json
import shutil

import evaluate_flat
import numpy as np
import pytest
import torch
from conftest import REPO, launch_two_processes, per_image_generators, run_cli
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from helpers import unbiased_mmd
from huggingface_hub import ModelCard
from PIL import Image
from scipy import linalg
from sklearn.datasets import load_digits

from diffusers_flat.evaluation.arguments import add_evaluation_arguments, parse_evaluation_flags
from diffusers_flat.evaluation.real_images import load_real_images
from diffusers_flat.evaluation.settings import EvaluationSettings
from diffusers_flat.metrics.empirical_score import EmpiricalDenoiser, find_collapse_sigma
from diffusers_flat.metrics.pfd import pfd
from diffusers_flat.run_directory import RunDirectory
from diffusers_flat.training.config import training_config
from diffusers_flat.utils.cli import OneLineArgumentParser


def pooled(images: np.ndarray) -> np.ndarray:
    """The same features, by hand in numpy, from uint8 NHWC 8x8x1 images."""
    return images[..., 0].astype(float).reshape(-1, 2, 4, 2, 4).mean(axis=(2, 4)).reshape(-1, 4)


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))


def digits_8x8() -> np.ndarray:
    """The embedded training set as the 8x8 models see it: uint8 NHWC."""
    return np.round(load_digits().images * 255 / 16).astype(np.uint8)[..., None]


def to_8bit(images: np.ndarray) -> np.ndarray:
    """diffusers' [0, 1] images to uint8 by guided-diffusion's truncation."""
    return np.floor(images * 255).astype(np.uint8)


def plain_diffusers_samples(path, steps: int, count: int, seed: int = 0) -> np.ndarray:
    pipeline = DDPMPipeline.from_pretrained(path)
    generator = per_image_generators(count, seed)
    images = pipeline(batch_size=count, generator=generator, num_inference_steps=steps, output_type="np").images
    return to_8bit(images)


def test_two_models_get_json_table_and_every_plot(two_models, tmp_path, pooled_inception, capsys):
    out = tmp_path / "eval"
    small = [
        "--num_samples",
        100,
        "--inference_steps",
        2,
        4,
        "--num_real",
        100,
        "--lpf_draws",
        3,
        "--gammas",
        0,
        5,
        10,
        "--directions",
        2,
        "--surface_resolution",
        3,
        "--exposure_samples",
        8,
        "--loss_samples",
        32,
        "--batch_size",
        100,
    ]
    models = [shutil.copytree(m, tmp_path / m.name) for m in two_models]
    evaluate_flat.main(
        evaluate_flat.parse_args(
            ["--model_path", *map(str, models), "--variant", "ema", "--output_dir", str(out), *map(str, small)]
        )
    )
    results = json.loads((out / "eval_results.json").read_text())
    assert list(results) == ["adm-ema", "sam-ema"]
    # The real images FID compares with: a fixed random 100 of the 1,797 digits (seed 0), in dataset order.
    real = pooled(digits_8x8()[np.sort(np.random.default_rng(0).permutation(1797)[:100])])
    training = digits_8x8().reshape(1797, -1).astype(float)
    for model, (name, r) in zip(models, results.items()):
        for steps in (2, 4):
            generated = plain_diffusers_samples(model / "ema", steps, 100)
            assert r["fid"][str(steps)] == pytest.approx(frechet(real, pooled(generated)), rel=1e-6)
            # KID on the same features: subsets of 100 of 100 images are all of them, so KID is the unbiased MMD^2.
            kid = r["kid"][str(steps)]
            assert kid["subset_size"] == 100 and kid["std"] <= 1e-9 * abs(kid["mean"])  # rounding only
            assert kid["mean"] == pytest.approx(unbiased_mmd(real, pooled(generated)), rel=1e-6)
        assert r["fid_num_generated"] == 100 and r["fid_num_real"] == 100
        # Memorization of the 4-step samples, by hand: nearest training image closer than 1/3 of the second nearest.
        distances = np.sqrt(((generated.reshape(100, -1)[:, None].astype(float) - training[None]) ** 2).sum(-1))
        two = np.sort(distances, axis=1)[:, :2]
        assert r["memorization"]["memorization_ratio"] == pytest.approx(np.mean(two[:, 0] < two[:, 1] / 3))
        assert r["lpf"]["num_draws"] == 3 and r["lpf"]["sigma"] == 0.01
        assert r["perturbation"]["gamma"] == [0.0, 5.0, 10.0] and r["perturbation"]["loss"][0] == r["loss"]
        assert r["perturbation"]["loss"][2] > r["loss"]  # a weight step of norm 10 must cost something
        assert r["exposure_bias"]["timesteps"] == [999, 666, 333, 0]  # linspace spacing
        assert json.loads((out / name / "eval_results.json").read_text()) == r
        assert json.loads((model / "ema" / "evaluation" / "eval_results.json").read_text()) == r
        assert f"| {name} | {r['fid']['2']:.2f} | {r['fid']['4']:.2f} |" in (out / name / "results.md").read_text()
        for png in ("memorization.png", "samples_2_steps.png", "samples_4_steps.png"):
            Image.open(out / name / png).verify()
    assert results["adm-ema"]["fid"] != results["sam-ema"]["fid"]
    for png in ("perturbation.png", "loss_surface.png", "exposure_bias.png"):
        Image.open(out / png).verify()
    table = (out / "results.md").read_text()
    assert "| adm-ema |" in table and "| sam-ema |" in table and "FID (2 steps)" in table
    assert "100 generated and 100 real images" in table
    assert table in capsys.readouterr().out


def quantized_by_hand(path, bits: int):
    """The UNet with every Conv2d/Linear weight on torchao's symmetric per-output-channel grid (the per-channel
    convention): scale = absmax / ((qmax - qmin) / 2), codes round(w * (1 / scale)) in [-2^(b-1), 2^(b-1) - 1]."""
    unet = UNet2DModel.from_pretrained(path, subfolder="unet")
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                w = module.weight
                scale = w.abs().flatten(1).max(dim=1).values / ((qmax - qmin) / 2)
                scale = scale.view(-1, *[1] * (w.ndim - 1))
                w.copy_(torch.clamp(torch.round(w * (1.0 / scale)), qmin, qmax) * scale)
    return unet


def small_classifier(path):
    """A randomly initialised 4-class ResNet for 1-channel 8x8 images, saved: a yardstick as good as any for
    counting which labels survive."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(3)
    config = ResNetConfig(
        num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=4, image_size=8
    )
    classifier = ResNetForImageClassification(config).eval()
    classifier.save_pretrained(path)
    return classifier


def labels_by_hand(classifier, images: np.ndarray) -> np.ndarray:
    """uint8 NHWC images scaled to [-1, 1], the classifier's argmax."""
    with torch.no_grad():
        pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)) / 127.5 - 1
        return classifier(pixel_values=pixels).logits.argmax(1).numpy()


def test_quantized_fid_gives_table_4_plots_and_card(two_models, tmp_path, pooled_inception):
    model = shutil.copytree(two_models[1], tmp_path / "sam")
    out = tmp_path / "eval"
    classifier = small_classifier(tmp_path / "classifier")
    evaluate_flat.main(
        evaluate_flat.parse_args(
            [
                "--model_path",
                str(model),
                "--metrics",
                "fid",
                "--num_samples",
                "100",
                "--num_real",
                "100",
                "--inference_steps",
                "2",
                "--quantize",
                "8",
                "4:per_channel",
                "--quantize_granularity",
                "per_channel",
                "--classifier",
                str(tmp_path / "classifier"),
                "--output_dir",
                str(out),
            ]
        )
    )
    r = json.loads((out / "eval_results.json").read_text())["sam"]
    levels = r["quantization"]["levels"]
    assert r["quantization"]["sampler"] == "ddpm" and set(levels) == {"8:per_channel", "4:per_channel"}
    assert levels["4:per_channel"]["bits"] == 4 and levels["4:per_channel"]["granularity"] == "per_channel"
    real = pooled(digits_8x8()[np.sort(np.random.default_rng(0).permutation(1797)[:100])])
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    expected, displacement = {}, {}
    fp32_images = plain_diffusers_samples(model, 2, 100).astype(float)
    fp32_labels = labels_by_hand(classifier, fp32_images.astype(np.uint8))
    assert len(np.unique(fp32_labels)) > 1  # a classifier that tells samples apart
    reference = np.bincount(labels_by_hand(classifier, digits_8x8()), minlength=4) / 1797  # no held-out split
    for bits in (8, 4):
        pipeline = DDPMPipeline(unet=quantized_by_hand(model, bits), scheduler=scheduler)
        images = pipeline(
            batch_size=100, generator=per_image_generators(100), num_inference_steps=2, output_type="np"
        ).images
        expected[bits] = frechet(real, pooled(to_8bit(images)))
        displacement[bits] = np.abs(to_8bit(images).astype(float) - fp32_images).mean()
        # class fidelity, counted by hand: labels kept, and total variation to the reference's class frequencies
        labels = labels_by_hand(classifier, to_8bit(images))
        fidelity = levels[f"{bits}:per_channel"]["class_fidelity"]["2"]
        assert fidelity["kept"] == np.mean(labels == fp32_labels) and fidelity["num_samples"] == 100
        for which, counted in (("histogram_distance", labels), ("fp32_histogram_distance", fp32_labels)):
            frequencies = np.bincount(counted, minlength=4) / 100
            assert fidelity[which] == pytest.approx(np.abs(frequencies - reference).sum() / 2), which
    # The same noise for fp32 and quantized weights: the samples move by the mean pixel displacement.
    for bits in (8, 4):
        moved = levels[f"{bits}:per_channel"]["pixel_displacement"]["2"]
        assert moved == pytest.approx(displacement[bits], rel=1e-6)
    assert 0 < displacement[8] < displacement[4]
    fp32, q8, q4 = r["fid"]["2"], levels["8:per_channel"]["fid"]["2"], levels["4:per_channel"]["fid"]["2"]
    assert (q8, q4) == (pytest.approx(expected[8], rel=1e-6), pytest.approx(expected[4], rel=1e-6))
    assert q4 != fp32  # 4-bit weights change the samples
    cells = [f"{fp32:.2f} → {q:.2f} ({q - fp32:+.2f})" for q in (q8, q4)]
    row = f"| sam | 2 | {fp32:.2f} | {cells[0]} | {cells[1]} |"
    assert row in (out / "results.md").read_text()
    kept = levels["4:per_channel"]["class_fidelity"]["2"]["kept"]
    assert f"| sam | 4:per_channel | 2 | {kept:.1%} |" in (out / "results.md").read_text()
    grid = out / "sam" / "samples_2_steps_4bit_per_channel.png"
    for png in (out / "fid_vs_bits.png", out / "sam" / "fid_vs_bits.png", grid):
        Image.open(png).verify()
    # The pipeline dir keeps the evaluation, and its card now reports it.
    assert json.loads((model / "evaluation" / "eval_results.json").read_text()) == r
    Image.open(model / "evaluation" / "fid_vs_bits.png").verify()
    card = ModelCard.load(model / "README.md")
    metrics = {m.metric_name: m.metric_value for m in card.data.eval_results}
    assert metrics["FID (2 steps, 8-bit per-channel weights)"] == pytest.approx(q8, abs=1e-4)
    assert metrics["FID (2 steps, 100 samples)"] == pytest.approx(fp32, abs=1e-4)
    assert row in card.text and "![FID against weight bits](evaluation/fid_vs_bits.png)" in card.text


def ddim_flow_by_hand(unet, abar: torch.Tensor, count: int, steps: int) -> torch.Tensor:
    """DDIM with eta = 0 written out, from the documented noise stream: from t = 999 down by 1000 / steps,
    x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t), x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps, with
    abar = 1 past the last step."""
    shape = (1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.cat([torch.randn(shape, generator=g) for g in per_image_generators(count)]).double()
    stride = 1000 // steps
    with torch.no_grad():
        for t in range(999, -1, -stride):
            eps = unet(x.float(), t).sample.double()
            x0 = (x - (1 - abar[t]).sqrt() * eps) / abar[t].sqrt()
            previous = abar[t - stride] if t - stride >= 0 else torch.tensor(1.0, dtype=torch.float64)
            x = previous.sqrt() * x0 + (1 - previous).sqrt() * eps
    return x


def test_pfd_against_a_teacher_is_the_hand_computed_distance(two_models, tmp_path):
    adm, sam = two_models
    out = tmp_path / "eval"
    argv = ["--model_path", adm, "--metrics", "pfd", "--pfd_reference", sam, "--pfd_noises", 6, "--pfd_steps", 5]
    evaluate_flat.main(evaluate_flat.parse_args(list(map(str, [*argv, "--batch_size", 4, "--output_dir", out]))))
    result = json.loads((out / "eval_results.json").read_text())["adm"]
    pipelines = [DDPMPipeline.from_pretrained(m) for m in (adm, sam)]
    abar = pipelines[0].scheduler.alphas_cumprod.double()
    ends = [ddim_flow_by_hand(p.unet, abar, 6, 5).flatten(1) for p in pipelines]
    outside = [((end - end.clamp(-1, 1)) ** 2).sum(1).mean().sqrt().item() for end in ends]
    a, b = (end.clamp(-1, 1) for end in ends)  # images: the data range
    a, b = (x / (x**2).sum(1, keepdim=True).sqrt() for x in (a, b))  # the default descriptor: unit-norm pixels
    squared = ((a - b) ** 2).sum(1)
    assert result["pfd"]["pfd"] == pytest.approx(squared.mean().sqrt().item(), rel=1e-4)
    stderr = (squared.std() / 6**0.5 / (2 * squared.mean().sqrt())).item()  # the delta method, by hand
    assert result["pfd"]["stderr"] == pytest.approx(stderr, rel=1e-3)
    assert result["pfd_reference"] == str(sam) and result["pfd"]["solver"] == "ddim"
    assert result["pfd"]["outside"] == pytest.approx(outside) and result["pfd"]["clamped"]
    # the results table (and so the model card) carries it, with its standard error and how it was measured
    table = (out / "results.md").read_text()
    assert f"| {result['pfd']['pfd']:.3f} ± {result['pfd']['stderr']:.3f} |" in table and "| PFD |" in table
    assert f"PFD of adm against {sam}: 6 shared noises, ddim in 5 steps, on pixels" in table


def test_pfd_against_the_empirical_denoiser_of_the_training_set(two_models, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model_path", two_models[0], "--metrics", "pfd", "--pfd_reference", "empirical", "--pfd_noises", 4]
    argv += ["--pfd_steps", 4, "--pfd_solver", "dpm-solver++", "--output_dir", out]
    evaluate_flat.main(evaluate_flat.parse_args(list(map(str, argv))))
    result = json.loads((out / "eval_results.json").read_text())["adm"]
    assert result["pfd_reference"] == "empirical" and result["pfd"]["solver"] == "dpm-solver++"
    assert 0 < result["pfd"]["pfd"] < float("inf") and result["pfd"]["num_noises"] == 4


def test_pfd_against_the_paper_s_smoothed_empirical_score_of_the_training_set(two_models, tmp_path):
    out = tmp_path / "eval"
    argv = ["--model_path", two_models[0], "--metrics", "pfd", "--pfd_reference", "smoothed", "--pfd_neighbours", 3]
    argv += ["--pfd_noises", 4, "--pfd_steps", 5, "--output_dir", out]
    evaluate_flat.main(evaluate_flat.parse_args(list(map(str, argv))))
    result = json.loads((out / "eval_results.json").read_text())["adm"]

    # The reference built here from its parts: the training images as the model saw them, sigma_c where the plain
    # denoiser's estimates collapse onto them, T_t = max(sigma_c / sigma_t, 1), the 3 nearest images.
    pipeline = DDPMPipeline.from_pretrained(two_models[0])
    record = training_config(RunDirectory(two_models[0]))
    real = load_real_images(record.data, pipeline.unet.config.sample_size, pipeline.unet.config.in_channels)
    images = real.training_images().tensors
    sigma_c = find_collapse_sigma(images, pipeline.scheduler)["collapse_sigma"]
    assert sigma_c is not None and result["pfd_smoothing"] == {"collapse_sigma": sigma_c, "neighbours": 3}
    reference = EmpiricalDenoiser.from_training_set(
        images, pipeline.scheduler, tempering="collapse", collapse_sigma=sigma_c, neighbours=3
    )
    expected = pfd(pipeline.unet, reference, pipeline.scheduler.config, num_noises=4, steps=5)
    assert result["pfd_reference"] == "smoothed"
    assert result["pfd"]["pfd"] == pytest.approx(expected["pfd"], rel=1e-5)
    table = (out / "results.md").read_text()
    assert (
        f"the smoothed empirical score of its training set (collapse level sigma_c {sigma_c:.3g}, 3 nearest" in table
    )


def test_a_noise_unconditional_model_against_the_smoothed_score_is_one_line(two_models, tmp_path, capsys):
    blind = shutil.copytree(two_models[0], tmp_path / "blind")
    record = json.loads((blind / "training_args.json").read_text())
    (blind / "training_args.json").write_text(json.dumps({**record, "noise_unconditional": True}))
    argv = ["--model_path", blind, "--metrics", "pfd", "--pfd_reference", "smoothed", "--output_dir", tmp_path / "out"]
    status, stderr = run_cli(evaluate_flat, argv, capsys)
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert status != 0 and len(errors) == 1, stderr[-2000:]
    assert "--pfd_reference smoothed: blind is blind to the noise level; compare it with 'empirical'" in errors[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model_path", "{tmp}"], "--model_path {tmp}: not a DDPMPipeline directory"),
        (["--model_path", "{adm}", "--metrics", "fid", "sharpness"], "--metrics: unknown sharpness"),
        (["--model_path", "{plain}", "--variant", "swa"], "--variant swa: {plain} was trained without use_swa"),
        (
            ["--model_path", "{adm}", "--num_samples", "10"],
            "--num_samples 10 is too few for a meaningful FID: use at least 100",
        ),
        (["--model_path", "{adm}", "--quantize", "9"], "--quantize level '9': B or B:granularity, B from 2 to 8"),
        (["--model_path", "{adm}", "--quantize", "4:per_row"], "--quantize level '4:per_row': B or B:granularity"),
        (["--model_path", "{adm}", "--quantize", "4", "4:per_tensor"], "--quantize names a level twice: 4, 4:per"),
        (["--model_path", "{adm}", "--sampler", "euler"], "--sampler must be one of ddim, ddpm, got 'euler'"),
        (
            ["--model_path", "{adm}", "--metrics", "lpf", "--quantize", "8"],
            "--quantize reports FID before -> after quantization: add fid to metrics",
        ),
        (["--model_path", "{adm}", "--quantize_granularity", "row"], "--quantize_granularity 'row': choose"),
        (["--model_path", "{adm}", "--inference_steps", "0"], "--inference_steps must be >= 1, got [0]"),
        (["--model_path", "{adm}", "--device", "tpu"], "--device 'tpu': use auto, cpu, cuda or cuda:N"),
        (["--model_path", "{adm}", "--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--model_path", "{adm}", "--fid_dtype", "float16"], "argument --fid_dtype: invalid choice: 'float16'"),
        (
            ["--model_path", "{adm}", "--metrics", "pfd"],
            "--pfd_reference: the pfd metric needs a pipeline directory, 'empirical' or 'smoothed'",
        ),
        (
            ["--model_path", "{adm}", "--metrics", "pfd", "--pfd_reference", "{tmp}"],
            "--pfd_reference {tmp}: neither 'empirical', 'smoothed' nor a pipeline directory with raw weights",
        ),
        (
            ["--model_path", "{adm}", "--metrics", "pfd", "--pfd_reference", "{big}"],
            "--pfd_reference {big}: its images are 1x16x16, adm's 1x8x8: PFD compares models of one shape",
        ),
        (
            ["--model_path", "{adm}", "--metrics", "pfd", "--pfd_reference", "empirical", "--pfd_solver", "euler"],
            "--pfd_solver must be one of ddim, dpm-solver++, got 'euler'",
        ),
        (
            ["--model_path", "{adm}", "--metrics", "pfd", "--pfd_reference", "empirical", "--pfd_steps", "30"],
            "--pfd_steps must divide the 1000 training timesteps for ddim",
        ),
        (
            ["--model_path", "{adm}", "--metrics", "sensitivity", "--ladder_steps", "30"],
            "--ladder_steps must divide the 1000 training timesteps for ddim",
        ),
        (
            ["--model_path", "{adm}", "--metrics", "sensitivity", "--ladder", "8", "1"],
            "--ladder bits must be an integer from 2 to 8, got 1",
        ),
    ],
)
def test_bad_input(two_models, grid_runs, tmp_path, flags, message, capsys):
    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a machine with CUDA")
    fill = {"tmp": tmp_path, "adm": two_models[0], "plain": grid_runs["plain"], "big": tmp_path / "big"}
    # a pipeline of 16x16 images, as PFD's mismatched reference
    unet = UNet2DModel(
        sample_size=16,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8,),
        norm_num_groups=4,
        down_block_types=("DownBlock2D",),
        up_block_types=("UpBlock2D",),
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "big")
    status, stderr = run_cli(
        evaluate_flat, [f.format(**fill) for f in flags] + ["--output_dir", tmp_path / "out"], capsys
    )
    assert status != 0
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and message.format(**fill) in errors[0], stderr[-2000:]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_give_the_fid_and_kid_of_one(two_models, tmp_path):
    # Real InceptionV3 in both runs (one here, one in two fresh processes); the real-image statistics are computed
    # once, by the first run, and shared.
    model = shutil.copytree(two_models[1], tmp_path / "sam")
    flags = ["--model_path", str(model), "--metrics", "fid", "--inference_steps", "2", "--num_samples", "100"]
    flags += ["--num_real", "100", "--device", "cpu", "--cache_dir", str(tmp_path / "cache"), "--fid_batch_size", "25"]
    evaluate_flat.main(evaluate_flat.parse_args([*flags, "--output_dir", str(tmp_path / "one")]))  # here
    script = str(REPO / "training_scripts" / "evaluate_flat.py")
    two = launch_two_processes(script, *flags, "--output_dir", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "eval_results.json").read_text())["sam"]
    b = json.loads((tmp_path / "two" / "eval_results.json").read_text())["sam"]
    assert b["fid"]["2"] == pytest.approx(a["fid"]["2"], rel=1e-4)
    assert b["kid"]["2"]["mean"] == pytest.approx(a["kid"]["2"]["mean"], rel=1e-4, abs=1e-7)
    assert b["fid_num_generated"] == a["fid_num_generated"] == 100
    # the same 100 images, in the same order: the first 64 make identical grids
    grids = [np.asarray(Image.open(tmp_path / run / "sam" / "samples_2_steps.png")) for run in ("one", "two")]
    assert np.array_equal(*grids)


def test_the_quantization_ladder_needs_no_feature_network_and_is_plotted(two_models, tmp_path):
    out = tmp_path / "eval"
    models = [shutil.copytree(model, tmp_path / model.name) for model in two_models]  # evaluation writes into them
    argv = ["--model_path", *map(str, models), "--metrics", "sensitivity", "--ladder", "8", "4"]
    argv += ["--ladder_samples", "4", "--ladder_steps", "10", "--loss_samples", "16", "--output_dir", str(out)]
    evaluate_flat.main(evaluate_flat.parse_args(argv))
    results = json.loads((out / "eval_results.json").read_text())
    for name in ("adm", "sam"):
        curves = results[name]["sensitivity"]["curves"]
        assert set(curves) == {"per_tensor", "per_channel"} and set(curves["per_tensor"]) == {"8", "4"}
        assert (out / name / "sensitivity.png").stat().st_size > 1000
    assert (out / "sensitivity.png").stat().st_size > 1000 and "fid" not in results["adm"]


def test_every_setting_is_a_flag_with_its_documented_meaning_and_default():
    """The flags are made from `EvaluationSettings` itself: one per field, its help the field's line of the class's
    `Args:` (read here by hand from the docstring), no flags given the default settings, tuples given as lists."""
    actions = {a.dest: a for a in add_evaluation_arguments(OneLineArgumentParser())._actions}
    doc = inspect.getdoc(EvaluationSettings)
    for field in dataclasses.fields(EvaluationSettings):
        action = actions[field.name]
        if field.name != "metrics":  # the one flag whose help lists the names instead
            first_line = doc.split(f"\n    {field.name}: ", 1)[1].split("\n")[0]
            assert action.help.startswith(first_line), field.name
        if isinstance(field.default, tuple):
            assert action.nargs == "+" and action.default == list(field.default), field.name
    assert parse_evaluation_flags([])[0] == EvaluationSettings()
    settings, _ = parse_evaluation_flags(["--gammas", "0", "1.5", "--classifier", "fashion-mnist", "--quantize", "4"])
    assert settings.gammas == (0.0, 1.5) and settings.classifier == "fashion-mnist" and settings.quantize == ("4",)
