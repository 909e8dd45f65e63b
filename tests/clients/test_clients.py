"""Real clients against a running sdserve: the official `openai` package and `webuiapi`
(an AUTOMATIC1111 client). Run by tests/clients/run.sh (which CI runs); prints
"N passed, M failed" and exits non-zero when a check fails.

Usage: python tests/clients/test_clients.py http://127.0.0.1:PORT
"""
import base64
import io
import sys
import threading
import time
import traceback
import urllib.request

import openai
import webuiapi
from PIL import Image

BASE = sys.argv[1].rstrip("/")
HOST, PORT = BASE.split("//")[1].split(":")
TESTS = []


def test(function):
    TESTS.append(function)
    return function


def pixels(png_bytes):
    return Image.open(io.BytesIO(png_bytes)).convert("RGB").tobytes()


@test
def openai_b64_json():
    client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused")
    result = client.images.generate(
        model="dall-e-3", prompt="a red circle", size="64x64", n=2, response_format="b64_json",
        extra_body={"steps": 3, "seed": 11},
    )
    assert len(result.data) == 2, result
    for image in result.data:
        png = base64.b64decode(image.b64_json)
        assert Image.open(io.BytesIO(png)).size == (64, 64)


@test
def openai_url():
    client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused")
    result = client.images.generate(
        prompt="a red circle", size="64x64", response_format="url", extra_body={"steps": 3, "seed": 11}
    )
    url = result.data[0].url
    assert url.startswith("http"), url
    with urllib.request.urlopen(url) as response:
        assert Image.open(io.BytesIO(response.read())).size == (64, 64)


@test
def openai_errors_are_readable_by_the_client():
    client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused")
    try:
        client.images.generate(prompt="x", size="65x64")
    except openai.BadRequestError as error:  # 400
        raise AssertionError(f"expected 422, got 400: {error}")
    except openai.UnprocessableEntityError as error:  # 422
        assert "size" in str(error), error
    else:
        raise AssertionError("an invalid size was accepted")


@test
def webuiapi_txt2img_and_listings():
    api = webuiapi.WebUIApi(host=HOST, port=int(PORT), sampler="DPM++ 2M Karras", steps=3)
    result = api.txt2img(prompt="a blue square", seed=5, width=64, height=64, batch_size=2)
    assert len(result.images) == 2, result.info
    assert result.info["all_seeds"] == [5, 6], result.info
    assert result.images[0].size == (64, 64)
    assert any(s["name"] == "Euler a" for s in api.get_samplers())
    assert api.get_sd_models(), "no models listed"
    assert isinstance(api.get_options(), dict)


@test
def webuiapi_progress_and_interrupt():
    api = webuiapi.WebUIApi(host=HOST, port=int(PORT), sampler="Euler a")
    outcome = {}

    def run():
        outcome["result"] = api.txt2img(prompt="a long job", seed=1, width=256, height=256, steps=150)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.time() + 60
    progress = api.get_progress()
    while time.time() < deadline and progress["state"]["sampling_step"] < 1:
        time.sleep(0.05)
        progress = api.get_progress()
    assert progress["state"]["sampling_step"] >= 1, progress
    assert 0.0 <= progress["progress"] <= 1.0, progress
    api.interrupt()
    worker.join(60)
    assert not worker.is_alive(), "interrupt did not stop the job"
    assert outcome["result"].info.get("interrupted") is True, outcome["result"].info


@test
def same_image_through_all_three_dialects():
    request = {"prompt": "a green star", "seed": 3, "steps": 3, "width": 64, "height": 64,
               "sampler": "Euler a"}
    native = urllib.request.Request(
        BASE + "/v1/generate", data=__import__("json").dumps(request).encode(),
        headers={"content-type": "application/json", "accept": "image/png"},
    )
    with urllib.request.urlopen(native) as response:
        native_pixels = pixels(response.read())
    client = openai.OpenAI(base_url=BASE + "/v1", api_key="unused")
    openai_png = base64.b64decode(client.images.generate(
        prompt="a green star", size="64x64", response_format="b64_json",
        extra_body={"steps": 3, "seed": 3, "sampler": "Euler a"},
    ).data[0].b64_json)
    api = webuiapi.WebUIApi(host=HOST, port=int(PORT), sampler="Euler a", steps=3)
    a1111 = api.txt2img(prompt="a green star", seed=3, width=64, height=64, cfg_scale=7.5)
    assert pixels(openai_png) == native_pixels, "OpenAI and native images differ"
    assert a1111.images[0].convert("RGB").tobytes() == native_pixels, "A1111 and native images differ"


def main():
    passed = failed = 0
    for function in TESTS:
        try:
            function()
        except Exception:  # noqa: BLE001 - report every failure, then exit non-zero
            failed += 1
            print(f"FAILED {function.__name__}")
            traceback.print_exc()
        else:
            passed += 1
            print(f"ok {function.__name__}")
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
