//! `edgewise-ratelimit`: Envoy's RateLimitService on limitador and Redis (services/ratelimit).

#[tokio::main]
async fn main() {
    let options = match edgewise_ratelimit::Options::from_args(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(e) => {
            eprintln!("edgewise-ratelimit: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = edgewise_ratelimit::run(options).await {
        eprintln!("edgewise-ratelimit: {e}");
        std::process::exit(1);
    }
}
