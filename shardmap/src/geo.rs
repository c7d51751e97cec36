//! Geographic routing: the region of a key value. A value is a configured region name, an ISO 3166 country
//! code, or an IP address looked up in a MaxMind database (`shard-geo-db`: the GeoIP2/GeoLite2 Country and
//! City layout, or ip-location-db's with a top-level `country_code`). Countries map to regions by continent,
//! unless `shard-geo-country-<CC>` or `shard-geo-continent-<CC>` says otherwise; no match is `shard-default`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

/// Continent codes as GeoNames and MaxMind write them.
pub const CONTINENTS: &[&str] = &["AF", "AN", "AS", "EU", "NA", "OC", "SA"];

/// ISO 3166-1 alpha-2 codes by continent (GeoNames' assignment).
const COUNTRIES: &[(&str, &str)] = &[
    ("AF", "AO BF BI BJ BW CD CF CG CI CM CV DJ DZ EG EH ER ET GA GH GM GN GQ GW KE KM LR LS LY MA MG ML MR MU MW MZ NA NE NG RE RW SC SD SH SL SN SO SS ST SZ TD TG TN TZ UG YT ZA ZM ZW"),
    ("AN", "AQ BV GS HM TF"),
    ("AS", "AE AF AM AZ BD BH BN BT CC CN CX GE HK ID IL IN IO IQ IR JO JP KG KH KP KR KW KZ LA LB LK MM MN MO MV MY NP OM PH PK PS QA SA SG SY TH TJ TL TM TR TW UZ VN YE"),
    ("EU", "AD AL AT AX BA BE BG BY CH CY CZ DE DK EE ES FI FO FR GB GG GI GR HR HU IE IM IS IT JE LI LT LU LV MC MD ME MK MT NL NO PL PT RO RS RU SE SI SJ SK SM UA VA XK"),
    ("NA", "AG AI AW BB BL BM BQ BS BZ CA CR CU CW DM DO GD GL GP GT HN HT JM KN KY LC MF MQ MS MX NI PA PM PR SV SX TC TT UM US VC VG VI"),
    ("OC", "AS AU CK FJ FM GU KI MH MP NC NF NR NU NZ PF PG PN PW SB TK TO TV VU WF WS"),
    ("SA", "AR BO BR CL CO EC FK GF GY PE PY SR UY VE"),
];

/// Region names tried, in order, for a continent when the config has no `shard-geo-continent-<CC>`.
const CONTINENT_REGIONS: &[(&str, &[&str])] = &[
    ("NA", &["na", "us", "north-america", "americas", "amer"]),
    ("SA", &["sa", "latam", "south-america", "americas", "amer", "us"]),
    ("EU", &["eu", "europe", "emea"]),
    ("AF", &["af", "africa", "emea", "eu"]),
    ("AS", &["asia", "as", "apac", "ap"]),
    ("OC", &["oc", "oceania", "au", "apac", "asia"]),
    ("AN", &[]),
];

/// The continent of an ISO country code (upper case).
pub fn continent_of(cc: &str) -> Option<&'static str> {
    if cc.len() != 2 {
        return None;
    }
    COUNTRIES.iter().find(|(_, list)| list.split(' ').any(|c| c == cc)).map(|(k, _)| *k)
}

/// A MaxMind-format database, read into memory once.
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GeoDb")
    }
}

impl GeoDb {
    pub fn open(path: &Path) -> Result<GeoDb, String> {
        let reader = maxminddb::Reader::open_readfile(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(GeoDb { reader })
    }

    /// The country (ISO code) and continent code of an address, when the database knows them.
    pub fn lookup(&self, ip: IpAddr) -> (Option<String>, Option<String>) {
        let Ok(found) = self.reader.lookup(ip) else { return (None, None) };
        let get = |path: &[maxminddb::PathElement<'_>]| -> Option<String> {
            found.decode_path::<String>(path).ok().flatten()
        };
        use maxminddb::PathElement::Key;
        let country = get(&[Key("country"), Key("iso_code")])
            .or_else(|| get(&[Key("registered_country"), Key("iso_code")]))
            .or_else(|| get(&[Key("country_code")]))
            .map(|c| c.to_ascii_uppercase());
        let continent = get(&[Key("continent"), Key("code")]).map(|c| c.to_ascii_uppercase());
        (country, continent)
    }
}

/// Resolves key values to regions.
#[derive(Debug)]
pub struct GeoResolver {
    /// Configured regions, lower case, in file order.
    pub regions: Vec<String>,
    pub country: BTreeMap<String, String>,
    pub continent: BTreeMap<String, String>,
    pub db: Option<GeoDb>,
}

/// How a value was placed, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// The region, or `None` for `shard-default`.
    pub region: Option<String>,
    pub country: Option<String>,
}

impl GeoResolver {
    pub fn resolve(&self, value: &str) -> Placement {
        let v = value.trim();
        let lower = v.to_ascii_lowercase();
        if self.regions.contains(&lower) {
            return Placement { region: Some(lower), country: None };
        }
        let upper = v.to_ascii_uppercase();
        if let Some(cont) = continent_of(&upper) {
            return Placement { region: self.region_for(&upper, Some(cont)), country: Some(upper) };
        }
        if let (Ok(ip), Some(db)) = (v.parse::<IpAddr>(), &self.db) {
            let (country, continent) = db.lookup(ip);
            if let Some(cc) = country {
                let cont = continent
                    .as_deref()
                    .and_then(|c| CONTINENTS.iter().find(|k| **k == c).copied())
                    .or_else(|| continent_of(&cc));
                return Placement { region: self.region_for(&cc, cont), country: Some(cc) };
            }
        }
        Placement { region: None, country: None }
    }

    fn region_for(&self, cc: &str, continent: Option<&str>) -> Option<String> {
        if let Some(r) = self.country.get(cc) {
            return Some(r.clone());
        }
        let cont = continent?;
        if let Some(r) = self.continent.get(cont) {
            return Some(r.clone());
        }
        let candidates = CONTINENT_REGIONS.iter().find(|(c, _)| *c == cont)?.1;
        candidates.iter().find(|r| self.regions.iter().any(|x| x == *r)).map(|r| r.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_country_once() {
        let mut seen = std::collections::HashSet::new();
        for (_, list) in COUNTRIES {
            for c in list.split(' ') {
                assert!(seen.insert(c), "{c} twice");
            }
        }
        assert!(seen.len() > 240);
    }

    #[test]
    fn by_continent_with_overrides() {
        let r = GeoResolver {
            regions: vec!["us".into(), "eu".into(), "asia".into()],
            country: [("BR".to_string(), "us".to_string())].into(),
            continent: BTreeMap::new(),
            db: None,
        };
        assert_eq!(r.resolve("DE").region.as_deref(), Some("eu"));
        assert_eq!(r.resolve("br").region.as_deref(), Some("us"));
        assert_eq!(r.resolve("JP").region.as_deref(), Some("asia"));
        assert_eq!(r.resolve("ZA").region.as_deref(), Some("eu"));
        assert_eq!(r.resolve("AU").region.as_deref(), Some("asia"));
        assert_eq!(r.resolve("EU").region.as_deref(), Some("eu"));
        assert_eq!(r.resolve("AQ").region, None);
        assert_eq!(r.resolve("atlantis").region, None);
    }
}
