use candle_core::{DType, Device};
use sdserve::pipeline::{LoadOptions, Pipeline};
fn main() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let refs = candle_core::safetensors::load(root.join("reference/sd1.safetensors"), &Device::Cpu).unwrap();
    let p = Pipeline::load("x", &root.join("sd1"), &LoadOptions::default()).unwrap();
    for case in ["euler_a_n2", "euler_a"] {
        let lat = &refs[&format!("pipeline.{case}.latents")];
        let imgs = p.decode_latents_to_rgb(lat).unwrap();
        let exp = refs[&format!("pipeline.{case}.image")].to_dtype(DType::U8).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap();
        let act: Vec<u8> = imgs.concat();
        let per = act.len() / imgs.len();
        for i in 0..imgs.len() {
            let d = act[i*per..(i+1)*per].iter().zip(&exp[i*per..(i+1)*per]).map(|(a,b)| a.abs_diff(*b)).max().unwrap();
            println!("{case} image {i}: decode-only max diff {d}");
        }
        // decode each image alone
        for i in 0..imgs.len() {
            let one = p.decode_latents_to_rgb(&lat.narrow(0, i, 1).unwrap()).unwrap();
            let d = one[0].iter().zip(&exp[i*per..(i+1)*per]).map(|(a,b)| a.abs_diff(*b)).max().unwrap();
            println!("{case} image {i}: alone max diff {d}");
        }
    }
}
