//! Bytes → TOML text + `OUTPOST_*` env overlay → `Config::from_toml_str`
//! (the body of `Config::load`). Input layout: TOML, a 0 byte, then env
//! lines `OUTPOST_X__Y=v`. A config that loads must also validate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::config::Config;

fuzz_target!(|data: &[u8]| {
    let (toml, env) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    let Ok(toml) = std::str::from_utf8(toml) else { return };
    let env: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    if let Ok(config) = Config::from_toml_str(toml, env) {
        assert!(config.validate().is_ok());
        let _ = config.log_path();
        let _ = config.secret_path();
        let _ = config.limits.rates_for("acme", "d1");
    }
});
