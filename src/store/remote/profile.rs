//! AWS shared configuration files (`~/.aws/credentials`, `~/.aws/config`): the named profile's
//! static keys, region and endpoint, for when they are not in the environment. The rules are
//! the AWS CLI's: `AWS_PROFILE` names the profile (else `default`); `AWS_SHARED_CREDENTIALS_FILE`
//! and `AWS_CONFIG_FILE` move the files; in the config file a profile's section is
//! `[profile NAME]` (`[default]` for the default one); environment variables win over both.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// What a profile gives.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProfileSettings {
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
}

/// The sections of an INI file as maps of lower-cased keys (comments `#` / `;`, blank lines
/// and indented continuation lines of nested settings are skipped).
fn sections(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut out: HashMap<String, HashMap<String, String>> = HashMap::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if line.is_empty() || line.starts_with(['#', ';']) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            let name = name.trim().to_string();
            out.entry(name.clone()).or_default();
            current = Some(name);
            continue;
        }
        if let (Some(section), Some((key, value))) = (&current, line.split_once('=')) {
            if let Some(map) = out.get_mut(section) {
                map.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
            }
        }
    }
    out
}

/// Reads `profile` from the credentials and config files' texts (each with its path, for
/// messages; `None` when the file does not exist). With `explicit` (the user named the
/// profile), a profile in neither file is an error; so is one that only names a credential
/// source firstkd does not run (a role, SSO, a process).
pub fn profile_settings(
    profile: &str,
    explicit: bool,
    credentials: Option<(&Path, &str)>,
    config: Option<(&Path, &str)>,
) -> Result<ProfileSettings> {
    let creds = credentials.map(|(_, t)| sections(t));
    let conf = config.map(|(_, t)| sections(t));
    let from_creds = creds.as_ref().and_then(|s| s.get(profile));
    let conf_name = if profile == "default" {
        "default".to_string()
    } else {
        format!("profile {profile}")
    };
    let from_conf = conf.as_ref().and_then(|s| s.get(&conf_name));
    let files = || {
        [credentials.map(|c| c.0), config.map(|c| c.0)]
            .into_iter()
            .flatten()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" and ")
    };
    if from_creds.is_none() && from_conf.is_none() {
        if explicit {
            return Err(Error::InvalidArgument(format!(
                "AWS profile {profile:?} is in none of {}",
                if files().is_empty() {
                    "the AWS configuration files (there are none)".to_string()
                } else {
                    files()
                }
            )));
        }
        return Ok(ProfileSettings::default());
    }
    let get = |key: &str| {
        from_creds
            .and_then(|m| m.get(key))
            .or_else(|| from_conf.and_then(|m| m.get(key)))
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let settings = ProfileSettings {
        access_key_id: get("aws_access_key_id"),
        secret_access_key: get("aws_secret_access_key"),
        session_token: get("aws_session_token"),
        region: from_conf.and_then(|m| m.get("region")).cloned(),
        endpoint_url: from_conf.and_then(|m| m.get("endpoint_url")).cloned(),
    };
    if settings.access_key_id.is_some() != settings.secret_access_key.is_some() {
        return Err(Error::InvalidArgument(format!(
            "AWS profile {profile:?} in {} has only one of aws_access_key_id and aws_secret_access_key",
            files()
        )));
    }
    if settings.access_key_id.is_none() {
        let source = [
            "role_arn",
            "sso_session",
            "sso_start_url",
            "credential_process",
        ]
        .into_iter()
        .find(|k| get(k).is_some());
        if let Some(source) = source {
            return Err(Error::InvalidArgument(format!(
                "AWS profile {profile:?} in {} gets its credentials through {source}, which \
                 firstkd does not run; export them into the environment first (for example \
                 `eval \"$(aws configure export-credentials --profile {profile} --format env)\"`)",
                files()
            )));
        }
    }
    Ok(settings)
}

/// The settings of the profile the environment names, from the files the environment names
/// (or `~/.aws/...`).
pub fn from_environment() -> Result<ProfileSettings> {
    let explicit = std::env::var("AWS_PROFILE").ok().filter(|p| !p.is_empty());
    let profile = explicit.clone().unwrap_or_else(|| "default".to_string());
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let file = |var: &str, name: &str| -> Option<PathBuf> {
        std::env::var_os(var)
            .map(PathBuf::from)
            .or_else(|| home.as_ref().map(|h| h.join(".aws").join(name)))
    };
    let read = |path: Option<PathBuf>| -> Result<Option<(PathBuf, String)>> {
        let Some(path) = path else { return Ok(None) };
        match std::fs::read_to_string(&path) {
            Ok(text) => Ok(Some((path, text))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(&path, e)),
        }
    };
    let credentials = read(file("AWS_SHARED_CREDENTIALS_FILE", "credentials"))?;
    let config = read(file("AWS_CONFIG_FILE", "config"))?;
    profile_settings(
        &profile,
        explicit.is_some(),
        credentials.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
        config.as_ref().map(|(p, t)| (p.as_path(), t.as_str())),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const CREDS: &str = "# keys\n[default]\naws_access_key_id = AKDEFAULT\naws_secret_access_key = s1\n\n\
                         [team]\naws_access_key_id=AKTEAM\naws_secret_access_key=s2\naws_session_token = tok\n";
    const CONF: &str = "[default]\nregion = eu-west-1\n[profile team]\nregion = us-west-2\n\
                        endpoint_url = http://127.0.0.1:9000\ns3 =\n  addressing_style = path\n\
                        [profile role]\nrole_arn = arn:aws:iam::1:role/x\nsource_profile = default\n";

    fn read(profile: &str, explicit: bool) -> Result<ProfileSettings> {
        profile_settings(
            profile,
            explicit,
            Some((Path::new("/h/.aws/credentials"), CREDS)),
            Some((Path::new("/h/.aws/config"), CONF)),
        )
    }

    #[test]
    fn a_named_profile_takes_keys_from_credentials_and_region_from_config() {
        let team = read("team", true).unwrap();
        assert_eq!(team.access_key_id.as_deref(), Some("AKTEAM"));
        assert_eq!(team.secret_access_key.as_deref(), Some("s2"));
        assert_eq!(team.session_token.as_deref(), Some("tok"));
        assert_eq!(team.region.as_deref(), Some("us-west-2"));
        assert_eq!(team.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        let default = read("default", false).unwrap();
        assert_eq!(default.access_key_id.as_deref(), Some("AKDEFAULT"));
        assert_eq!(default.region.as_deref(), Some("eu-west-1"));
        assert_eq!(default.endpoint_url, None);
    }

    #[test]
    fn a_missing_or_unsupported_profile_is_a_clear_error() {
        let err = read("nobody", true).unwrap_err().to_string();
        assert!(
            err.contains("\"nobody\"") && err.contains("/h/.aws/credentials"),
            "{err}"
        );
        // Not named by the user: nothing from the files, no error.
        assert_eq!(read("nobody", false).unwrap(), ProfileSettings::default());
        let err = read("role", true).unwrap_err().to_string();
        assert!(
            err.contains("role_arn") && err.contains("export-credentials"),
            "{err}"
        );
        let half = profile_settings(
            "x",
            true,
            Some((Path::new("c"), "[x]\naws_access_key_id = A\n")),
            None,
        );
        assert!(half.unwrap_err().to_string().contains("only one of"));
        let none = profile_settings("x", true, None, None)
            .unwrap_err()
            .to_string();
        assert!(none.contains("there are none"), "{none}");
    }
}
