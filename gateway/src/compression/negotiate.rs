//! permessage-deflate negotiation (RFC 7692 §5, §7.1) over the `Sec-WebSocket-Extensions`
//! grammar of RFC 6455 §9.1.
//!
//! Three jobs, one per way the gateway stands in a handshake:
//!
//! - **server** (client → gateway, terminate mode): [`accept`] picks the first acceptable
//!   offer, bounded by a [`DeflatePolicy`], and gives the response header and the
//!   [`DeflateConfig`] of the gateway's deflater and inflater;
//! - **client** (gateway → upstream, terminate mode): [`client_offer`] builds the offer and
//!   [`validate_response`] checks the upstream's answer and gives the gateway's config;
//! - **passthrough**: the client's offer goes upstream verbatim, and
//!   [`validate_passthrough`] checks that the upstream's answer is one the client can accept
//!   before it is forwarded.
//!
//! A server declines a bad offer (it skips to the next one) and never fails a handshake
//! over one (RFC 7692 §7.1: "A server MUST decline an extension negotiation offer ... if");
//! a client fails the connection over a bad response ("A client MUST _Fail the WebSocket
//! Connection_ if the peer server accepted ... with ... ") — for the gateway, a 502.
//!
//! Window bits 8: zlib (and zlib-rs) cannot compress raw deflate with a 256-byte window.
//! Like Node's zlib and Chromium, the gateway still agrees to 8 and compresses with 9
//! instead: zlib never emits a distance over `window - 262` (250 for 9 bits), so the
//! stream is valid for a peer inflating with 256 bytes. Inflating, 8 is read with a 9-bit
//! window, which accepts everything an 8-bit one does. See [`super::codec`].

use std::fmt;

/// The extension's registered name.
pub const PERMESSAGE_DEFLATE: &str = "permessage-deflate";

const SERVER_NO_CONTEXT_TAKEOVER: &str = "server_no_context_takeover";
const CLIENT_NO_CONTEXT_TAKEOVER: &str = "client_no_context_takeover";
const SERVER_MAX_WINDOW_BITS: &str = "server_max_window_bits";
const CLIENT_MAX_WINDOW_BITS: &str = "client_max_window_bits";

/// The LZ77 window when no parameter limits it.
pub const MAX_WINDOW_BITS: u8 = 15;
/// The smallest window RFC 7692 allows.
pub const MIN_WINDOW_BITS: u8 = 8;

// ---------------------------------------------------------------------------------------
// The header grammar (RFC 6455 §9.1)
// ---------------------------------------------------------------------------------------

/// One element of a `Sec-WebSocket-Extensions` list: the extension's name and its
/// parameters, quoted values already unquoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    pub name: String,
    pub params: Vec<(String, Option<String>)>,
}

/// Why an element of the list does not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError(pub &'static str);

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(is_tchar)
}

/// Splits `s` at `sep` outside quoted strings. The last piece carries `Err` when a quoted
/// string is left open (nothing after it can be trusted).
fn split_outside_quotes(s: &str, sep: u8) -> Vec<Result<&str, SyntaxError>> {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let (mut start, mut i, mut quoted) = (0, 0, false);
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b if b == sep && !quoted => {
                out.push(Ok(&s[start..i]));
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if quoted {
        out.push(Err(SyntaxError("unterminated quoted string")));
    } else {
        out.push(Ok(&s[start..]));
    }
    out
}

/// A parameter value: a token, or a quoted string whose content (after unescaping) is a
/// token (RFC 6455 §9.1).
fn param_value(raw: &str) -> Result<String, SyntaxError> {
    let raw = raw.trim_matches([' ', '\t']);
    let value = if let Some(inner) = raw.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or(SyntaxError("text after a quoted value"))?;
        let mut value = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => value.push(chars.next().ok_or(SyntaxError("dangling escape"))?),
                '"' => return Err(SyntaxError("text after a quoted value")),
                c => value.push(c),
            }
        }
        value
    } else {
        raw.to_string()
    };
    if !is_token(&value) {
        return Err(SyntaxError("parameter value is not a token"));
    }
    Ok(value)
}

fn parse_element(element: &str) -> Result<Extension, SyntaxError> {
    let mut parts = split_outside_quotes(element, b';').into_iter();
    let name = parts.next().expect("split yields at least one piece")?.trim_matches([' ', '\t']);
    if !is_token(name) {
        return Err(SyntaxError("extension name is not a token"));
    }
    let mut params = Vec::new();
    for part in parts {
        let part = part?;
        let (pname, value) = match part.split_once('=') {
            Some((n, v)) => (n, Some(param_value(v)?)),
            None => (part, None),
        };
        let pname = pname.trim_matches([' ', '\t']);
        if !is_token(pname) {
            return Err(SyntaxError("parameter name is not a token"));
        }
        params.push((pname.to_ascii_lowercase(), value));
    }
    Ok(Extension { name: name.to_ascii_lowercase(), params })
}

/// Parses `Sec-WebSocket-Extensions` values (several header lines form one list). Each
/// element is returned in order, `Err` when it does not parse, so a server can skip it and
/// a client can fail. Empty elements (`a, , b`) are ignored, as HTTP lists allow. Names are
/// compared case-insensitively, so they are returned lower-cased.
pub fn parse_extensions<'a>(values: impl IntoIterator<Item = &'a str>) -> Vec<Result<Extension, SyntaxError>> {
    let mut out = Vec::new();
    for value in values {
        for element in split_outside_quotes(value, b',') {
            match element {
                Ok(e) if e.trim_matches([' ', '\t']).is_empty() => {}
                Ok(e) => out.push(parse_element(e)),
                Err(e) => out.push(Err(e)),
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// Parameters
// ---------------------------------------------------------------------------------------

/// Why a parameter list is not acceptable (RFC 7692 §7.1: unknown name, invalid value,
/// repeated name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamError {
    Unknown(String),
    Duplicate(String),
    /// A value where none is allowed, none where one is required, or out of 8..=15.
    InvalidValue(String),
}

impl fmt::Display for ParamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamError::Unknown(p) => write!(f, "unknown parameter {p}"),
            ParamError::Duplicate(p) => write!(f, "parameter {p} given twice"),
            ParamError::InvalidValue(p) => write!(f, "invalid value for {p}"),
        }
    }
}

/// Window bits as RFC 7692 §7.1.2 writes them: 8..=15, decimal, no leading zero.
fn window_bits(name: &str, value: Option<&str>) -> Result<u8, ParamError> {
    match value {
        Some(v @ ("8" | "9" | "10" | "11" | "12" | "13" | "14" | "15")) => Ok(v.parse().unwrap()),
        _ => Err(ParamError::InvalidValue(name.to_string())),
    }
}

fn flag(name: &str, value: Option<&str>) -> Result<bool, ParamError> {
    match value {
        None => Ok(true),
        Some(_) => Err(ParamError::InvalidValue(name.to_string())),
    }
}

/// A client's permessage-deflate offer (RFC 7692 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeflateOffer {
    /// The client asks the server not to use context takeover.
    pub server_no_context_takeover: bool,
    /// The client says it will not use context takeover (a hint).
    pub client_no_context_takeover: bool,
    /// The client asks the server to compress with at most this window.
    pub server_max_window_bits: Option<u8>,
    /// `None`: absent — the client cannot take a limit, so a response must not carry one.
    /// `Some(None)`: present without a value — the server may set any limit.
    /// `Some(Some(n))`: the client will compress with at most `n` bits anyway.
    pub client_max_window_bits: Option<Option<u8>>,
}

impl DeflateOffer {
    /// Reads an offer's parameters; any error means the offer must be declined.
    pub fn from_params(params: &[(String, Option<String>)]) -> Result<DeflateOffer, ParamError> {
        let mut offer = DeflateOffer::default();
        let mut seen = [false; 4];
        for (name, value) in params {
            let value = value.as_deref();
            let index = match name.as_str() {
                SERVER_NO_CONTEXT_TAKEOVER => 0,
                CLIENT_NO_CONTEXT_TAKEOVER => 1,
                SERVER_MAX_WINDOW_BITS => 2,
                CLIENT_MAX_WINDOW_BITS => 3,
                _ => return Err(ParamError::Unknown(name.clone())),
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(ParamError::Duplicate(name.clone()));
            }
            match index {
                0 => offer.server_no_context_takeover = flag(name, value)?,
                1 => offer.client_no_context_takeover = flag(name, value)?,
                2 => offer.server_max_window_bits = Some(window_bits(name, value)?),
                _ => {
                    offer.client_max_window_bits =
                        Some(value.map(|v| window_bits(name, Some(v))).transpose()?)
                }
            }
        }
        Ok(offer)
    }

    /// The offer as one element of a `Sec-WebSocket-Extensions` list.
    pub fn header_value(&self) -> String {
        let mut s = String::from(PERMESSAGE_DEFLATE);
        if self.server_no_context_takeover {
            s.push_str("; ");
            s.push_str(SERVER_NO_CONTEXT_TAKEOVER);
        }
        if self.client_no_context_takeover {
            s.push_str("; ");
            s.push_str(CLIENT_NO_CONTEXT_TAKEOVER);
        }
        if let Some(bits) = self.server_max_window_bits {
            s.push_str(&format!("; {SERVER_MAX_WINDOW_BITS}={bits}"));
        }
        match self.client_max_window_bits {
            Some(Some(bits)) => s.push_str(&format!("; {CLIENT_MAX_WINDOW_BITS}={bits}")),
            Some(None) => {
                s.push_str("; ");
                s.push_str(CLIENT_MAX_WINDOW_BITS);
            }
            None => {}
        }
        s
    }
}

/// The agreed parameters, as a server's response states them (RFC 7692 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeflateParams {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    /// The server compresses with at most this window (15 when absent).
    pub server_max_window_bits: Option<u8>,
    /// The client compresses with at most this window (15 when absent, or the offer's value).
    pub client_max_window_bits: Option<u8>,
}

impl DeflateParams {
    /// Reads a response's parameters. Stricter than an offer: `client_max_window_bits`
    /// needs a value.
    pub fn from_params(params: &[(String, Option<String>)]) -> Result<DeflateParams, ParamError> {
        let offer = DeflateOffer::from_params(params)?;
        let client_max_window_bits = match offer.client_max_window_bits {
            Some(None) => return Err(ParamError::InvalidValue(CLIENT_MAX_WINDOW_BITS.into())),
            Some(Some(bits)) => Some(bits),
            None => None,
        };
        Ok(DeflateParams {
            server_no_context_takeover: offer.server_no_context_takeover,
            client_no_context_takeover: offer.client_no_context_takeover,
            server_max_window_bits: offer.server_max_window_bits,
            client_max_window_bits,
        })
    }

    /// The response's `Sec-WebSocket-Extensions` value.
    pub fn header_value(&self) -> String {
        DeflateOffer {
            server_no_context_takeover: self.server_no_context_takeover,
            client_no_context_takeover: self.client_no_context_takeover,
            server_max_window_bits: self.server_max_window_bits,
            client_max_window_bits: self.client_max_window_bits.map(Some),
        }
        .header_value()
    }

    /// Whether a server could answer `offer` with these parameters (RFC 7692 §7.1.1–7.1.2).
    pub fn answers(&self, offer: &DeflateOffer) -> Result<(), &'static str> {
        if offer.server_no_context_takeover && !self.server_no_context_takeover {
            return Err("server_no_context_takeover was requested but not agreed");
        }
        if let Some(asked) = offer.server_max_window_bits {
            match self.server_max_window_bits {
                None => return Err("server_max_window_bits was requested but not agreed"),
                Some(bits) if bits > asked => {
                    return Err("server_max_window_bits is larger than requested")
                }
                Some(_) => {}
            }
        }
        match (offer.client_max_window_bits, self.client_max_window_bits) {
            (None, Some(_)) => return Err("client_max_window_bits was not offered"),
            (Some(Some(limit)), Some(bits)) if bits > limit => {
                return Err("client_max_window_bits is larger than offered")
            }
            _ => {}
        }
        Ok(())
    }

    /// The gateway's codecs when it is the server of this agreement.
    pub fn server_config(&self) -> DeflateConfig {
        DeflateConfig {
            compress: CodecParams {
                window_bits: self.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
                no_context_takeover: self.server_no_context_takeover,
            },
            decompress: CodecParams {
                window_bits: self.client_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
                no_context_takeover: self.client_no_context_takeover,
            },
        }
    }

    /// The gateway's codecs when it is the client of this agreement, having sent `offer`:
    /// its own hints (a window value, `client_no_context_takeover`) bind it too.
    pub fn client_config(&self, offer: &DeflateOffer) -> DeflateConfig {
        let own_limit = offer.client_max_window_bits.flatten().unwrap_or(MAX_WINDOW_BITS);
        DeflateConfig {
            compress: CodecParams {
                window_bits: self.client_max_window_bits.unwrap_or(MAX_WINDOW_BITS).min(own_limit),
                no_context_takeover: self.client_no_context_takeover
                    || offer.client_no_context_takeover,
            },
            decompress: CodecParams {
                window_bits: self.server_max_window_bits.unwrap_or(MAX_WINDOW_BITS),
                no_context_takeover: self.server_no_context_takeover,
            },
        }
    }
}

/// One direction's codec settings: the LZ77 window (8..=15, as agreed on the wire) and
/// whether the context is reset after every message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CodecParams {
    pub window_bits: u8,
    pub no_context_takeover: bool,
}

/// The gateway's side of an agreement: how it compresses what it sends and decompresses
/// what it receives on this link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflateConfig {
    pub compress: CodecParams,
    pub decompress: CodecParams,
}

impl DeflateConfig {
    /// The deflater for messages the gateway sends on this link (allocates nothing yet).
    pub fn deflater(&self) -> super::Deflater {
        super::Deflater::new(self.compress)
    }

    /// The inflater for messages the gateway receives on this link, refusing messages
    /// that inflate past `max_message_size` (allocates nothing yet).
    pub fn inflater(&self, max_message_size: u64) -> super::Inflater {
        super::Inflater::new(self.decompress, max_message_size)
    }
}

// ---------------------------------------------------------------------------------------
// Policy and the three roles
// ---------------------------------------------------------------------------------------

/// What the gateway wants for a connection, chosen by a plugin (`accept.compression`) or
/// the configuration. It bounds both directions where RFC 7692 lets the server choose:
/// the gateway's own deflater always, the peer's deflater (= the gateway's inflater) when
/// the peer offered `client_max_window_bits`, and context takeover both ways.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeflatePolicy {
    /// 8..=15; smaller saves memory per connection.
    pub max_window_bits: u8,
    /// Reset the context after every message, both ways, so idle connections can free
    /// their zlib state.
    pub no_context_takeover: bool,
}

impl Default for DeflatePolicy {
    fn default() -> DeflatePolicy {
        DeflatePolicy { max_window_bits: MAX_WINDOW_BITS, no_context_takeover: false }
    }
}

impl DeflatePolicy {
    /// A policy with `max_window_bits` clamped into 8..=15.
    pub fn new(max_window_bits: u8, no_context_takeover: bool) -> DeflatePolicy {
        DeflatePolicy {
            max_window_bits: max_window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS),
            no_context_takeover,
        }
    }

    fn bits(&self) -> u8 {
        self.max_window_bits.clamp(MIN_WINDOW_BITS, MAX_WINDOW_BITS)
    }

    /// The parameters the gateway answers `offer` with, as a server. Every well-formed
    /// offer is acceptable: the gateway supports every window and both takeover modes.
    pub fn answer(&self, offer: &DeflateOffer) -> DeflateParams {
        let bits = self.bits();
        let limit = |wanted: Option<u8>| match wanted {
            Some(w) => Some(w.min(bits)),
            None if bits < MAX_WINDOW_BITS => Some(bits),
            None => None,
        };
        DeflateParams {
            server_no_context_takeover: offer.server_no_context_takeover || self.no_context_takeover,
            // The client's hint costs nothing to confirm, and lets the inflater be freed.
            client_no_context_takeover: offer.client_no_context_takeover || self.no_context_takeover,
            server_max_window_bits: limit(offer.server_max_window_bits),
            client_max_window_bits: match offer.client_max_window_bits {
                None => None,
                Some(wanted) => limit(wanted),
            },
        }
    }
}

/// The outcome of a server-side negotiation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub params: DeflateParams,
    /// For the 101's `Sec-WebSocket-Extensions`.
    pub header: String,
    pub config: DeflateConfig,
}

/// Server role: the first acceptable permessage-deflate offer among the client's
/// `Sec-WebSocket-Extensions` values, answered under `policy`; `None` to go without
/// compression. Malformed elements and offers are skipped; other extensions are ignored.
pub fn accept<'a>(offer_values: impl IntoIterator<Item = &'a str>, policy: &DeflatePolicy) -> Option<Accepted> {
    parse_extensions(offer_values)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.name == PERMESSAGE_DEFLATE)
        .find_map(|e| DeflateOffer::from_params(&e.params).ok())
        .map(|offer| {
            let params = policy.answer(&offer);
            Accepted { params, header: params.header_value(), config: params.server_config() }
        })
}

/// Client role: the offers the gateway sends upstream under `policy`, best first. The
/// first asks for the policy's window both ways; the second, for servers that decline a
/// `server_max_window_bits` request, asks only for what the gateway can impose itself.
pub fn client_offers(policy: &DeflatePolicy) -> Vec<DeflateOffer> {
    let bits = policy.bits();
    let nct = policy.no_context_takeover;
    let own = DeflateOffer {
        server_no_context_takeover: false,
        client_no_context_takeover: nct,
        server_max_window_bits: None,
        client_max_window_bits: Some(if bits < MAX_WINDOW_BITS { Some(bits) } else { None }),
    };
    let preferred = DeflateOffer {
        server_no_context_takeover: nct,
        server_max_window_bits: (bits < MAX_WINDOW_BITS).then_some(bits),
        ..own
    };
    if preferred == own {
        vec![own]
    } else {
        vec![preferred, own]
    }
}

/// The `Sec-WebSocket-Extensions` value for [`client_offers`].
pub fn client_offer(policy: &DeflatePolicy) -> String {
    client_offers(policy).iter().map(DeflateOffer::header_value).collect::<Vec<_>>().join(", ")
}

/// Why a server's response cannot be accepted; the gateway answers its client with 502.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NegotiationError {
    Syntax(SyntaxError),
    /// The response names an extension that was not offered, or that the relay cannot
    /// carry (anything but permessage-deflate).
    Unsupported(String),
    /// The response names permessage-deflate more than once.
    Duplicate,
    Param(ParamError),
    /// The parameters answer none of the offers.
    Incompatible(&'static str),
}

impl fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NegotiationError::Syntax(e) => write!(f, "malformed Sec-WebSocket-Extensions: {e}"),
            NegotiationError::Unsupported(name) => write!(f, "extension {name} was not offered or is not supported"),
            NegotiationError::Duplicate => f.write_str("permessage-deflate accepted twice"),
            NegotiationError::Param(e) => write!(f, "permessage-deflate: {e}"),
            NegotiationError::Incompatible(why) => write!(f, "permessage-deflate: {why}"),
        }
    }
}

impl std::error::Error for NegotiationError {}

/// Checks a response against offers; `Ok(Some((params, i)))` when offer `i` (the first
/// one the response answers) was accepted.
fn check_response<'a>(
    offers: &[DeflateOffer],
    response_values: impl IntoIterator<Item = &'a str>,
) -> Result<Option<(DeflateParams, usize)>, NegotiationError> {
    let mut accepted = None;
    for element in parse_extensions(response_values) {
        let extension = element.map_err(NegotiationError::Syntax)?;
        if extension.name != PERMESSAGE_DEFLATE || offers.is_empty() {
            return Err(NegotiationError::Unsupported(extension.name));
        }
        if accepted.is_some() {
            return Err(NegotiationError::Duplicate);
        }
        let params = DeflateParams::from_params(&extension.params).map_err(NegotiationError::Param)?;
        let mut why = "";
        let index = offers.iter().position(|offer| match params.answers(offer) {
            Ok(()) => true,
            Err(e) => {
                why = e;
                false
            }
        });
        match index {
            Some(i) => accepted = Some((params, i)),
            None => return Err(NegotiationError::Incompatible(why)),
        }
    }
    Ok(accepted)
}

/// Client role: checks the upstream's `Sec-WebSocket-Extensions` (all its values; none
/// for "no extension") against the offers the gateway sent ([`client_offers`]) and
/// returns the agreement with the gateway's config, or `None` for no compression.
pub fn validate_response<'a>(
    offers: &[DeflateOffer],
    response_values: impl IntoIterator<Item = &'a str>,
) -> Result<Option<(DeflateParams, DeflateConfig)>, NegotiationError> {
    Ok(check_response(offers, response_values)?
        .map(|(params, i)| (params, params.client_config(&offers[i]))))
}

/// Passthrough: checks that the upstream's answer to the client's offer (forwarded
/// verbatim) is one the client can accept: only permessage-deflate, once, with
/// parameters that answer one of the client's well-formed offers. Returns the agreement
/// (so the relay allows RSV1 on both links), or `None` when the upstream declined. The
/// client's and upstream's frames are not touched, so no codec is needed.
pub fn validate_passthrough<'a, 'b>(
    client_offer_values: impl IntoIterator<Item = &'a str>,
    response_values: impl IntoIterator<Item = &'b str>,
) -> Result<Option<DeflateParams>, NegotiationError> {
    let offers: Vec<DeflateOffer> = parse_extensions(client_offer_values)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.name == PERMESSAGE_DEFLATE)
        .filter_map(|e| DeflateOffer::from_params(&e.params).ok())
        .collect();
    Ok(check_response(&offers, response_values)?.map(|(params, _)| params))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(name: &str, params: &[(&str, Option<&str>)]) -> Extension {
        Extension {
            name: name.into(),
            params: params.iter().map(|(n, v)| (n.to_string(), v.map(str::to_string))).collect(),
        }
    }

    #[test]
    fn parses_lists_params_and_quoted_values() {
        let parsed = parse_extensions([
            "permessage-deflate; client_max_window_bits; server_max_window_bits=\"10\", x-foo",
            " Permessage-Deflate ;Server_No_Context_Takeover , ,foo; a=\"b\\\"c\"",
        ]);
        assert_eq!(parsed.len(), 4);
        assert_eq!(
            parsed[0],
            Ok(ext(
                "permessage-deflate",
                &[("client_max_window_bits", None), ("server_max_window_bits", Some("10"))]
            ))
        );
        assert_eq!(parsed[1], Ok(ext("x-foo", &[])));
        assert_eq!(parsed[2], Ok(ext("permessage-deflate", &[("server_no_context_takeover", None)])));
        // b"c is not a token once unquoted.
        assert!(parsed[3].is_err());
    }

    #[test]
    fn quoted_separators_stay_inside_their_element() {
        let parsed = parse_extensions(["a; p=\"x,y\", b; q=\"1;2\", c"]);
        assert_eq!(parsed.len(), 3);
        assert!(parsed[0].is_err() && parsed[1].is_err(), "not tokens: {parsed:?}");
        assert_eq!(parsed[2], Ok(ext("c", &[])));
    }

    #[test]
    fn malformed_elements_are_errors() {
        for bad in [
            "permessage-deflate; =1",
            "permessage-deflate; a b",
            "perm essage",
            ";x",
            "permessage-deflate; a=",
            "permessage-deflate; a=\"1\"x",
            "permessage-deflate; a=\"1",
            "permessage-deflate; a=\"\"",
            "permessage-deflate; a=1=2",
        ] {
            let parsed = parse_extensions([bad]);
            assert!(parsed.iter().any(Result::is_err), "{bad}: {parsed:?}");
        }
        // An open quote swallows the rest: nothing after it is trusted.
        assert_eq!(parse_extensions(["a; p=\"x, b"]).len(), 1);
    }

    fn offer(s: &str) -> Result<DeflateOffer, ParamError> {
        let parsed = parse_extensions([s]);
        DeflateOffer::from_params(&parsed[0].as_ref().unwrap().params)
    }

    #[test]
    fn reads_every_offer_parameter() {
        assert_eq!(offer("permessage-deflate"), Ok(DeflateOffer::default()));
        assert_eq!(
            offer(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=8; client_max_window_bits=15"
            ),
            Ok(DeflateOffer {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: Some(8),
                client_max_window_bits: Some(Some(15)),
            })
        );
        assert_eq!(
            offer("permessage-deflate; client_max_window_bits").unwrap().client_max_window_bits,
            Some(None)
        );
        assert_eq!(
            offer("permessage-deflate; server_max_window_bits=\"12\"").unwrap().server_max_window_bits,
            Some(12)
        );
    }

    #[test]
    fn refuses_bad_offer_parameters() {
        use ParamError::*;
        let cases: &[(&str, ParamError)] = &[
            ("permessage-deflate; foo", Unknown("foo".into())),
            ("permessage-deflate; server_no_context_takeover=1", InvalidValue(SERVER_NO_CONTEXT_TAKEOVER.into())),
            ("permessage-deflate; client_no_context_takeover=x", InvalidValue(CLIENT_NO_CONTEXT_TAKEOVER.into())),
            ("permessage-deflate; server_max_window_bits", InvalidValue(SERVER_MAX_WINDOW_BITS.into())),
            ("permessage-deflate; server_max_window_bits=7", InvalidValue(SERVER_MAX_WINDOW_BITS.into())),
            ("permessage-deflate; server_max_window_bits=16", InvalidValue(SERVER_MAX_WINDOW_BITS.into())),
            ("permessage-deflate; server_max_window_bits=010", InvalidValue(SERVER_MAX_WINDOW_BITS.into())),
            ("permessage-deflate; server_max_window_bits=-9", InvalidValue(SERVER_MAX_WINDOW_BITS.into())),
            ("permessage-deflate; client_max_window_bits=0", InvalidValue(CLIENT_MAX_WINDOW_BITS.into())),
            ("permessage-deflate; client_max_window_bits=1a", InvalidValue(CLIENT_MAX_WINDOW_BITS.into())),
            ("permessage-deflate; client_max_window_bits=\"99\"", InvalidValue(CLIENT_MAX_WINDOW_BITS.into())),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                Duplicate(SERVER_NO_CONTEXT_TAKEOVER.into()),
            ),
            (
                "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
                Duplicate(CLIENT_NO_CONTEXT_TAKEOVER.into()),
            ),
            (
                "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
                Duplicate(SERVER_MAX_WINDOW_BITS.into()),
            ),
            (
                "permessage-deflate; client_max_window_bits; client_max_window_bits=9",
                Duplicate(CLIENT_MAX_WINDOW_BITS.into()),
            ),
        ];
        for (header, expected) in cases {
            assert_eq!(offer(header).as_ref(), Err(expected), "{header}");
        }
    }

    const POLICY: DeflatePolicy = DeflatePolicy { max_window_bits: 12, no_context_takeover: false };

    #[test]
    fn server_answers_every_parameter_under_the_policy() {
        let a = accept(["permessage-deflate"], &POLICY).unwrap();
        assert_eq!(a.header, "permessage-deflate; server_max_window_bits=12");
        assert_eq!(a.config.compress, CodecParams { window_bits: 12, no_context_takeover: false });
        // The client cannot take a window limit: it may use 15.
        assert_eq!(a.config.decompress, CodecParams { window_bits: 15, no_context_takeover: false });

        let a = accept(["permessage-deflate; client_max_window_bits"], &POLICY).unwrap();
        assert_eq!(a.header, "permessage-deflate; server_max_window_bits=12; client_max_window_bits=12");
        assert_eq!(a.config.decompress.window_bits, 12);

        let a = accept(["permessage-deflate; client_max_window_bits=9; server_max_window_bits=10"], &POLICY).unwrap();
        assert_eq!(a.header, "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9");
        assert_eq!((a.config.compress.window_bits, a.config.decompress.window_bits), (10, 9));

        let a = accept(["permessage-deflate; server_max_window_bits=8"], &POLICY).unwrap();
        assert_eq!(a.params.server_max_window_bits, Some(8), "8 is agreed; the codec deflates with 9");

        let a = accept(["permessage-deflate; server_no_context_takeover; client_no_context_takeover"], &POLICY).unwrap();
        assert_eq!(
            a.header,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=12"
        );
        assert!(a.config.compress.no_context_takeover && a.config.decompress.no_context_takeover);

        let open = DeflatePolicy::default();
        let a = accept(["permessage-deflate; client_max_window_bits"], &open).unwrap();
        assert_eq!(a.header, "permessage-deflate");
        assert_eq!(a.config.compress, CodecParams { window_bits: 15, no_context_takeover: false });

        let strict = DeflatePolicy::new(9, true);
        let a = accept(["permessage-deflate"], &strict).unwrap();
        assert_eq!(
            a.header,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=9"
        );
        assert_eq!(DeflatePolicy::new(3, false).max_window_bits, 8);
        assert_eq!(DeflatePolicy::new(99, false).max_window_bits, 15);
    }

    #[test]
    fn server_skips_bad_offers_and_other_extensions() {
        let a = accept(
            [
                "x-webkit-deflate-frame, permessage-deflate; server_max_window_bits=7",
                "permessage-deflate; bogus, permessage-deflate; a=\"open",
            ],
            &POLICY,
        );
        assert_eq!(a, None, "every offer is bad; the open quote hides the rest");
        let a = accept(
            ["permessage-deflate; server_max_window_bits, permessage-deflate; client_max_window_bits=10"],
            &POLICY,
        )
        .unwrap();
        assert_eq!(a.params.client_max_window_bits, Some(10), "second offer accepted");
        assert_eq!(accept(Vec::<&str>::new(), &POLICY), None);
        assert_eq!(accept(["x-foo; bar"], &POLICY), None);
    }

    #[test]
    fn answers_always_match_their_offers() {
        // Every offer the grammar allows, under every policy: the answer is valid for it.
        let bits = [None, Some(8u8), Some(9), Some(12), Some(15)];
        for snct in [false, true] {
            for cnct in [false, true] {
                for smwb in bits {
                    for cmwb in [None, Some(None), Some(Some(8)), Some(Some(11)), Some(Some(15))] {
                        let offer = DeflateOffer {
                            server_no_context_takeover: snct,
                            client_no_context_takeover: cnct,
                            server_max_window_bits: smwb,
                            client_max_window_bits: cmwb,
                        };
                        for pbits in 8..=15 {
                            for pnct in [false, true] {
                                let policy = DeflatePolicy::new(pbits, pnct);
                                let params = policy.answer(&offer);
                                assert_eq!(params.answers(&offer), Ok(()), "{offer:?} {policy:?}");
                                let config = params.server_config();
                                assert!(config.compress.window_bits <= pbits);
                                if cmwb.is_some() {
                                    assert!(config.decompress.window_bits <= pbits);
                                }
                                // Round trip through the header.
                                let parsed = parse_extensions([params.header_value().as_str()]);
                                let back = DeflateParams::from_params(&parsed[0].as_ref().unwrap().params);
                                assert_eq!(back, Ok(params));
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn client_offers_and_validates_responses() {
        let policy = DeflatePolicy::new(10, true);
        let offers = client_offers(&policy);
        assert_eq!(
            client_offer(&policy),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits=10, \
             permessage-deflate; client_no_context_takeover; client_max_window_bits=10"
        );
        assert_eq!(client_offer(&DeflatePolicy::default()), "permessage-deflate; client_max_window_bits");

        // No extension in the response: no compression.
        assert_eq!(validate_response(&offers, []), Ok(None));
        // The preferred offer accepted.
        let (params, config) = validate_response(
            &offers,
            ["permessage-deflate; server_no_context_takeover; server_max_window_bits=9; client_max_window_bits=9"],
        )
        .unwrap()
        .unwrap();
        assert_eq!(params.server_max_window_bits, Some(9));
        assert_eq!(config.compress, CodecParams { window_bits: 9, no_context_takeover: true });
        assert_eq!(config.decompress, CodecParams { window_bits: 9, no_context_takeover: true });
        // The fallback accepted: the server keeps its 15-bit window and its context; the
        // gateway still honours its own hints.
        let (_, config) = validate_response(&offers, ["permessage-deflate"]).unwrap().unwrap();
        assert_eq!(config.compress, CodecParams { window_bits: 10, no_context_takeover: true });
        assert_eq!(config.decompress, CodecParams { window_bits: 15, no_context_takeover: false });
    }

    #[test]
    fn client_rejects_bad_responses() {
        let offers = vec![DeflateOffer {
            server_no_context_takeover: true,
            server_max_window_bits: Some(10),
            ..DeflateOffer::default()
        }];
        let bad: &[(&str, &str)] = &[
            ("x-foo", "not offered"),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=10, permessage-deflate", "twice"),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=10; foo", "unknown"),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=10", "not offered"),
            ("permessage-deflate; server_max_window_bits=10", "takeover"),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=11", "larger"),
            ("permessage-deflate; server_no_context_takeover", "missing window"),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits", "no value"),
            ("permessage-deflate; server_no_context_takeover=1; server_max_window_bits=10", "flag value"),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=10; server_max_window_bits=9", "dup"),
            ("permessage-deflate; server_no_context_takeover; server_max_window_bits=\"10", "syntax"),
        ];
        for (response, why) in bad {
            assert!(validate_response(&offers, [*response]).is_err(), "{why}: {response}");
        }
        let ok = "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=8";
        assert!(validate_response(&offers, [ok]).unwrap().is_some());
        // client_max_window_bits in a response needs a value, within the offered limit.
        let offers = vec![DeflateOffer { client_max_window_bits: Some(Some(11)), ..DeflateOffer::default() }];
        assert!(validate_response(&offers, ["permessage-deflate; client_max_window_bits"]).is_err());
        assert!(validate_response(&offers, ["permessage-deflate; client_max_window_bits=12"]).is_err());
        let (_, config) = validate_response(&offers, ["permessage-deflate"]).unwrap().unwrap();
        assert_eq!(config.compress.window_bits, 11, "the offer's own limit binds the gateway");
    }

    #[test]
    fn passthrough_checks_the_upstream_against_the_clients_offers() {
        let client = ["permessage-deflate; server_max_window_bits=10; client_max_window_bits, permessage-deflate"];
        assert_eq!(validate_passthrough(client, []), Ok(None));
        let params = validate_passthrough(client, ["permessage-deflate; server_max_window_bits=10; client_max_window_bits=10"])
            .unwrap()
            .unwrap();
        assert_eq!(params.client_max_window_bits, Some(10));
        // Answers the second offer.
        assert!(validate_passthrough(client, ["permessage-deflate; server_max_window_bits=12"]).unwrap().is_some());
        assert!(validate_passthrough(client, ["permessage-deflate; client_no_context_takeover"]).unwrap().is_some());
        // No offer allows it.
        assert!(matches!(
            validate_passthrough(["permessage-deflate"], ["permessage-deflate; client_max_window_bits=10"]),
            Err(NegotiationError::Incompatible(_))
        ));
        // The client offered nothing, or only malformed offers.
        assert!(validate_passthrough([], ["permessage-deflate"]).is_err());
        assert!(validate_passthrough(["permessage-deflate; x=1"], ["permessage-deflate"]).is_err());
        // Other extensions cannot pass the relay.
        assert_eq!(
            validate_passthrough(["x-foo, permessage-deflate"], ["x-foo"]),
            Err(NegotiationError::Unsupported("x-foo".into()))
        );
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        /// `Sec-WebSocket-Extensions` values built from the grammar's pieces, right and wrong.
        fn header_values() -> impl Strategy<Value = Vec<String>> {
            let piece = prop::sample::select(vec![
                "permessage-deflate", "permessage-deflate", "x-webkit-deflate-frame", "; ", ";", ", ", ",", " ", "\t",
                "server_no_context_takeover", "client_no_context_takeover", "server_max_window_bits",
                "client_max_window_bits", "=", "=8", "=9", "=12", "=15", "=16", "=0", "=08", "=\"10\"", "\"", "\\",
                "x", "\u{e4}",
            ]);
            let value = prop::collection::vec(piece, 0..12).prop_map(|p| p.concat());
            prop::collection::vec(value, 0..3)
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(400))]

            #[test]
            fn accepted_offers_answer_within_the_policy(values in header_values(), bits in 8u8..=15, nct in any::<bool>()) {
                let policy = DeflatePolicy::new(bits, nct);
                let Some(accepted) = accept(values.iter().map(String::as_str), &policy) else { return Ok(()) };
                // The answer re-parses to what was agreed.
                let parsed = parse_extensions([accepted.header.as_str()]);
                prop_assert_eq!(parsed.len(), 1);
                let element = parsed[0].clone().unwrap();
                prop_assert_eq!(element.name.as_str(), PERMESSAGE_DEFLATE);
                prop_assert_eq!(DeflateParams::from_params(&element.params), Ok(accepted.params));
                // It answers one of the offers the client made.
                let offers: Vec<DeflateOffer> = parse_extensions(values.iter().map(String::as_str))
                    .into_iter()
                    .filter_map(Result::ok)
                    .filter(|e| e.name == PERMESSAGE_DEFLATE)
                    .filter_map(|e| DeflateOffer::from_params(&e.params).ok())
                    .collect();
                prop_assert!(offers.iter().any(|o| accepted.params.answers(o).is_ok()));
                // And keeps to the policy.
                prop_assert!(accepted.config.compress.window_bits <= bits);
                if nct {
                    prop_assert!(accepted.params.server_no_context_takeover && accepted.params.client_no_context_takeover);
                }
                // The upstream answering the same way passes the passthrough check.
                let answer = validate_passthrough(values.iter().map(String::as_str), [accepted.header.as_str()]);
                prop_assert!(answer.is_ok(), "{:?}", answer);
            }

            #[test]
            fn random_answers_never_panic(offers in header_values(), answers in header_values()) {
                let _ = validate_passthrough(offers.iter().map(String::as_str), answers.iter().map(String::as_str));
                let policy = DeflatePolicy::new(10, false);
                let _ = validate_response(&client_offers(&policy), answers.iter().map(String::as_str));
            }

            #[test]
            fn arbitrary_text_never_panics(text in prop::collection::vec(any::<char>(), 0..64)) {
                let text: String = text.into_iter().collect();
                let _ = accept([text.as_str()], &DeflatePolicy::default());
                let _ = validate_passthrough([text.as_str()], [text.as_str()]);
            }
        }
    }
}
