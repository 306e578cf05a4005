"""Request fields -> jobs on the shipped demo model (no generation): defaults, group keys, one-line refusals."""
import pytest
from PIL import Image

from lumina_jax.inference import DEFAULT_CHECKPOINT, InferenceError, Lumina
from lumina_jax.serve import forms

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def lm():
    return Lumina.load(DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def defaults(lm):
    return forms.defaults_for(lm, demo=True)


def test_demo_defaults_are_the_make_demo_settings_at_the_largest_square(lm, defaults):
    assert defaults == forms.Defaults("128x128", 3.0, 0.05, 16)
    assert forms.size_choices(lm)[0] == "256x64" and "128x128" in forms.size_choices(lm)
    other = forms.defaults_for(lm, demo=False)  # a real checkpoint: the t2i preset's values
    assert (other.guidance, other.guidance_floor, other.image_top_k) == (4.0, 0.0, 2000)


def test_t2i_job_fills_defaults_and_limits_the_answer_to_the_image(lm, defaults):
    job = forms.t2i_job(lm, defaults, PROMPT, seed=7, num_images=2)
    s = job.settings
    assert (s.task, s.size, s.guidance, s.guidance_floor, s.image_top_k) == ("t2i", (128, 128), 3.0, 0.05, 16)
    assert s.max_new_tokens == 8 * (8 + 1) + 2 and (job.seed, job.num_images) == (7, 2)


def test_requests_differing_only_in_prompt_and_seed_share_a_group(lm, defaults):
    a = forms.t2i_job(lm, defaults, PROMPT, seed=0)
    b = forms.t2i_job(lm, defaults, "a green square on a white background", seed=99, num_images=3)
    assert a.settings == b.settings
    assert forms.t2i_job(lm, defaults, PROMPT, size="64x256").settings != a.settings
    assert forms.t2i_job(lm, defaults, PROMPT, guidance=2.0).settings != a.settings
    long = forms.t2i_job(lm, defaults, " ".join([PROMPT] * 20))  # a longer padded prompt: another program
    assert long.settings.prompt_width > a.settings.prompt_width and long.settings != a.settings


@pytest.mark.parametrize("fields, message", [
    (dict(prompt=""), "task 't2i' needs a text prompt"),
    (dict(prompt="   "), "task 't2i' needs a text prompt"),
    (dict(prompt=5), "prompt must be text, got int"),
    (dict(prompt="x" * (forms.MAX_PROMPT_CHARS + 1)), f"at most {forms.MAX_PROMPT_CHARS} are accepted"),
    (dict(size="100x100"), "size 100x100 is not on the crop list for target size 128"),
    (dict(size="big"), "size 'big' is not WIDTHxHEIGHT"),
    (dict(guidance=float("nan")), "must be a finite number, got nan"),
    (dict(guidance=0.0), "must be > 0"),
    (dict(guidance_floor=float("inf")), "must be a finite number, got inf"),
    (dict(guidance_floor=1.0), "must be in [0, 1)"),
    (dict(image_top_k=-1), "top-k must be >= 0"),
    (dict(seed=-1), "seed must be an integer in [0, 4294967295]"),
    (dict(seed=2.5), "seed must be an integer"),
    (dict(num_images=0), "number of images must be an integer from 1 to 8, got 0"),
    (dict(num_images=9), "got 9"),
    (dict(num_images=True), "got True"),
])
def test_bad_fields_are_refused_with_the_library_message(lm, defaults, fields, message):
    fields = {"prompt": PROMPT, **fields}
    with pytest.raises(InferenceError) as e:
        forms.t2i_job(lm, defaults, **fields)
    assert message in str(e.value)


def test_image_job_takes_the_omni_preset_and_one_image(lm):
    photo = Image.new("RGB", (100, 80), (200, 30, 30))
    job = forms.image_job(lm, "depth", photo, seed=3)
    assert (job.settings.task, job.settings.guidance, job.settings.image_top_k, len(job.images)) == ("depth", 1.0,
                                                                                                     200, 1)
    with pytest.raises(InferenceError, match="not an image-to-image task"):
        forms.image_job(lm, "t2i", photo)
    with pytest.raises(InferenceError, match="task 'editing' needs a text prompt"):
        forms.image_job(lm, "editing", photo, prompt="")


def test_chat_job_appends_the_new_message_and_its_images_to_the_conversation(lm):
    red, blue = Image.new("RGB", (64, 64), (215, 40, 40)), Image.new("RGB", (64, 64), (40, 75, 215))
    job = forms.chat_job(lm, [("Draw a red square. <|image|>", "Done: <|image|>")], [red, blue], "And this?", [red])
    assert job.prompt == [("Draw a red square. <|image|>", "Done: <|image|>"), ("And this? <|image|>", None)]
    assert len(job.images) == 3 and job.settings.task == "chat"
    with pytest.raises(InferenceError, match="the message is empty"):
        forms.chat_job(lm, [], [], "  ", [])
    with pytest.raises(InferenceError, match="image"):  # a typed marker without an image to fill it
        forms.chat_job(lm, [], [], "what is <|image|>", [])


def test_load_image_names_a_file_that_is_not_an_image(tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(InferenceError, match=r"notes.png: not an image file PIL can read \(UnidentifiedImageError\)"):
        forms.load_image(fake)
    real = tmp_path / "real.png"
    Image.new("RGB", (10, 7), (1, 2, 3)).save(real)
    assert forms.load_image(real).size == (10, 7)
