//! Reading back the MP4s the tool writes: its H.264 track decoded with OpenH264.

use std::io::Cursor;
use std::path::Path;

/// The frames of an MP4's H.264 track as RGB bytes, with its size and frame rate.
pub fn decode_mp4(path: &Path) -> (Vec<Vec<u8>>, (usize, usize), f64) {
    use openh264::decoder::Decoder;
    use openh264::formats::YUVSource;
    let bytes = std::fs::read(path).unwrap();
    let mut reader = mp4::Mp4Reader::read_header(Cursor::new(&bytes), bytes.len() as u64).unwrap();
    let track = reader.tracks().values().next().expect("one track");
    assert_eq!(track.media_type().unwrap(), mp4::MediaType::H264);
    let (id, samples, size, fps) =
        (track.track_id(), track.sample_count(), (track.width() as usize, track.height() as usize), track.frame_rate());
    // Parameter sets from the header, then each sample's length-prefixed units, as Annex B.
    let avc = &track.trak.mdia.minf.stbl.stsd.avc1.as_ref().unwrap().avcc;
    let mut decoder = Decoder::new().unwrap();
    let mut frames = Vec::new();
    let mut stream = Vec::new();
    for set in avc.sequence_parameter_sets.iter().chain(&avc.picture_parameter_sets) {
        stream.extend_from_slice(&[0, 0, 0, 1]);
        stream.extend_from_slice(&set.bytes);
    }
    for i in 1..=samples {
        let sample = reader.read_sample(id, i).unwrap().unwrap();
        let mut data = &sample.bytes[..];
        while data.len() >= 4 {
            let len = u32::from_be_bytes(data[..4].try_into().unwrap()) as usize;
            stream.extend_from_slice(&[0, 0, 0, 1]);
            stream.extend_from_slice(&data[4..4 + len]);
            data = &data[4 + len..];
        }
        if let Some(image) = decoder.decode(&stream).unwrap() {
            assert_eq!(image.dimensions(), size);
            let mut rgb = vec![0; size.0 * size.1 * 3];
            image.write_rgb8(&mut rgb);
            frames.push(rgb);
        }
        stream.clear();
    }
    for image in decoder.flush_remaining().unwrap() {
        let mut rgb = vec![0; size.0 * size.1 * 3];
        image.write_rgb8(&mut rgb);
        frames.push(rgb);
    }
    (frames, size, fps)
}
