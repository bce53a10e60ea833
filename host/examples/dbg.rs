use std::path::Path;
use tessera::backends::gguf::GgufModel;
use tessera::inference::*;
fn main() {
    let t = std::time::Instant::now();
    let mut m = GgufModel::load("q", Path::new("/tmp/qw/qwen.gguf")).unwrap();
    println!("load {:?} {:?}", t.elapsed(), m.facts());
    let ctx = CallCtx {
        deadline: std::time::Instant::now() + std::time::Duration::from_secs(120),
    };
    for q in [
        "What is the capital of France?",
        "Write 3 haikus about 12 cats & 7 dogs!",
    ] {
        println!("{:?}", m.encode_input(&Input::Chat(vec![Message::user(q)])).unwrap());
    }
    println!(
        "{:?}",
        m.next_token(ctx, &Input::Prompt("The capital of France is".into()), 3)
    );
    let t = std::time::Instant::now();
    let g = m
        .generate(
            ctx,
            &Input::Chat(vec![Message::user("What is the capital of France?")]),
            &GenParams {
                max_tokens: Some(20),
                ..Default::default()
            },
        )
        .unwrap();
    println!("{:?} {:?}", g, t.elapsed());
    println!(
        "{:?}",
        m.score(
            ctx,
            &Input::Prompt("The capital of France is".into()),
            &[" Paris".into(), " London is big".into(), " Paris, of course".into()]
        )
    );
}
