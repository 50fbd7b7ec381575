//! MTCNN against facenet-pytorch 2.6.0 with its real weights (tools/reference/mtcnn.py): the
//! three networks on random inputs.

mod common;

use candle_core::{Device, Tensor};
use common::{assert_close, load_tensors};
use stableid::models::mtcnn::Mtcnn;

const PARITY: &str = "parity/mtcnn.safetensors";
const TOL: f32 = 1e-4;

#[test]
fn the_three_nets_match_facenet_pytorch_on_the_shipped_weights() {
    let t = load_tensors(PARITY);
    let mtcnn = Mtcnn::shipped(&Device::Cpu).unwrap();
    let get = |name: &str| -> &Tensor { &t[name] };
    for i in 0..3 {
        let (reg, prob) = mtcnn.pnet.forward(get(&format!("pnet{i}.input"))).unwrap();
        assert_close(&reg, get(&format!("pnet{i}.reg")), TOL, &format!("pnet{i} regression"));
        assert_close(&prob, get(&format!("pnet{i}.prob")), TOL, &format!("pnet{i} probabilities"));
    }
    let (reg, prob) = mtcnn.rnet.forward(get("rnet.input")).unwrap();
    assert_close(&reg, get("rnet.reg"), TOL, "rnet regression");
    assert_close(&prob, get("rnet.prob"), TOL, "rnet probabilities");
    let (reg, landmarks, prob) = mtcnn.onet.forward(get("onet.input")).unwrap();
    assert_close(&reg, get("onet.reg"), TOL, "onet regression");
    assert_close(&landmarks, get("onet.landmarks"), TOL, "onet landmarks");
    assert_close(&prob, get("onet.prob"), TOL, "onet probabilities");
}
