//! img2img and inpainting through the native API against the real server with the
//! bundled tiny model: the image fields work end to end, and bad images are refused with
//! a 4xx naming the field.

mod service_support;

use base64::Engine;
use serde_json::{json, Value};
use service_support::{error_body, test_settings, Double, TestServer};

fn png_base64(image: image::DynamicImage) -> String {
    let mut png = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png).unwrap();
    base64::engine::general_purpose::STANDARD.encode(png)
}

fn gradient(width: u32, height: u32) -> String {
    png_base64(image::DynamicImage::ImageRgb8(image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 3) as u8, (y * 3) as u8, 128])
    })))
}

#[tokio::test]
async fn native_img2img_and_inpainting_run_and_take_the_init_image_size() {
    let server = TestServer::start(test_settings(), Double::None).await;
    // 83×70 → 80×64 output when no size is given.
    let request = json!({"prompt": "a cube", "steps": 2, "seed": 3, "strength": 0.5,
        "init_image": format!("data:image/png;base64,{}", gradient(83, 70))});
    let response = server.post_json("/v1/generate", &request).await;
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["parameters"]["width"], 80, "{body}");
    assert_eq!(body["parameters"]["height"], 64, "{body}");

    for mode in ["resize", "crop", "fill"] {
        let mask = png_base64(image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(
            40,
            30,
            |x, _| image::Luma([if x > 20 { 255 } else { 0 }]),
        )));
        let request = json!({"prompt": "a cube", "steps": 2, "seed": 3, "width": 64,
            "height": 64, "init_image": gradient(75, 70), "mask_image": mask,
            "resize_mode": mode, "mask_blur": 2, "paste_back": false});
        let response = server.post_json("/v1/generate", &request).await;
        assert_eq!(response.status(), 200, "{mode}");
    }

    // "Inpaint only masked": a small square is repainted at full size and pasted back;
    // everything outside it keeps the init image's pixels.
    let mask = image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if (40..48).contains(&x) && (8..16).contains(&y) { 255 } else { 0 }])
    });
    let init = gradient(64, 64);
    let request = json!({"prompt": "a cube", "steps": 2, "seed": 3, "init_image": init,
        "mask_image": png_base64(image::DynamicImage::ImageLuma8(mask.clone())),
        "mask_blur": 0, "inpaint_full_res": true, "inpaint_full_res_padding": 4,
        "strength": 1.0});
    let body: Value = server.post_json("/v1/generate", &request).await.json().await.unwrap();
    let decode = |text: &str| {
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap();
        image::load_from_memory(&bytes).unwrap().to_rgb8()
    };
    let output = decode(body["images"][0]["data"].as_str().unwrap());
    let original = decode(&init);
    assert_eq!(output.dimensions(), (64, 64));
    let mut changed = 0;
    for (x, y, pixel) in output.enumerate_pixels() {
        if mask.get_pixel(x, y)[0] == 0 {
            assert_eq!(pixel, original.get_pixel(x, y), "({x}, {y}) outside the mask");
        } else if pixel != original.get_pixel(x, y) {
            changed += 1;
        }
    }
    assert!(changed > 0, "the masked square was repainted");
    server.stop().await;
}

#[tokio::test]
async fn bad_image_fields_get_a_422_naming_the_field() {
    let server = TestServer::start(test_settings(), Double::None).await;
    let init = gradient(64, 64);
    let black = png_base64(image::DynamicImage::ImageLuma8(image::GrayImage::new(64, 64)));
    // A 4100×4100 PNG compresses to a few kilobytes: refused before its pixels are decoded.
    let bomb = png_base64(image::DynamicImage::ImageLuma8(image::GrayImage::new(4100, 4100)));
    let cases = [
        (json!({"init_image": "%%% not base64"}), "init_image"),
        (json!({"init_image": "data:text/plain;base64,aGVsbG8="}), "init_image"),
        (json!({"init_image": bomb}), "init_image"),
        (json!({"mask_image": init}), "mask_image"),
        (json!({"strength": 0.5}), "strength"),
        (json!({"init_image": init, "strength": 1.5}), "strength"),
        (json!({"init_image": init, "strength": 0.0}), "strength"),
        // 2 steps × 0.2 strength leaves no step to run.
        (json!({"init_image": init, "strength": 0.2}), "strength"),
        (json!({"init_image": init, "resize_mode": "zoom"}), "resize_mode"),
        (json!({"init_image": init, "mask_image": "xyz"}), "mask_image"),
        (json!({"init_image": init, "mask_image": init, "mask_blur": 500}), "mask_blur"),
        (json!({"init_image": init, "inpaint_full_res": true}), "inpaint_full_res"),
        (json!({"init_image": init, "mask_image": black, "inpaint_full_res": true}), "mask_image"),
    ];
    for (extra, field) in cases {
        let mut request = json!({"prompt": "x", "steps": 2, "seed": 1});
        for (key, value) in extra.as_object().unwrap() {
            request[key] = value.clone();
        }
        let error = error_body(server.post_json("/v1/generate", &request).await, 422).await;
        assert_eq!(error["param"], field, "{error}");
    }
    server.stop().await;
}
