//! `edgewise-control`: the serverless ingress's management service (services/control).

#[tokio::main]
async fn main() {
    let options = match edgewise_control::Options::from_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("edgewise-control: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = edgewise_control::run(options).await {
        eprintln!("edgewise-control: {e}");
        std::process::exit(1);
    }
}
