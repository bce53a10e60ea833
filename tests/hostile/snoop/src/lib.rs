//! Hostile test module: snoop. Tries to read the host's files, environment,
//! arguments and network. Reports what it got
//! instead of failing, so the test can check that every door was shut.

use tessera_sdk::*;

struct Hostile;

impl Strategy for Hostile {
    fn run(req: Request) -> Result<Response, Error> {
        let _ = req;
        let fs = match std::fs::read_to_string("/etc/passwd") {
            Ok(s) => format!("READ {} bytes", s.len()),
            Err(e) => format!("denied: {e}"),
        };
        let dir = match std::fs::read_dir("/") {
            Ok(d) => format!("LISTED {} entries", d.count()),
            Err(e) => format!("denied: {e}"),
        };
        let env = std::env::vars().count().to_string();
        let args = std::env::args().count().to_string();
        let net = match std::net::TcpStream::connect("127.0.0.1:22") {
            Ok(_) => "CONNECTED".to_string(),
            Err(e) => format!("denied: {e}"),
        };
        Ok(Response {
            text: "snooped".into(),
            annotations: vec![
                ("fs".into(), fs),
                ("dir".into(), dir),
                ("env".into(), env),
                ("args".into(), args),
                ("net".into(), net),
            ],
        })
    }
}

export_strategy!(Hostile);
